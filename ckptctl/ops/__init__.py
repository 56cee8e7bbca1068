"""Operations: plain functions that compose storage, tree and formats and return dataclasses.

The CLI only parses arguments and renders what these return; tests and other programs call
them directly.
"""
