"""TEST-ONLY shim for megatron-core's unconditional CUDA calls, so that megatron-core
``dist_checkpointing.save`` / ``load`` can run on a CPU-only machine under a gloo group.

Scope (exactly this, nothing more):

- ``torch.cuda.synchronize`` becomes a no-op.  megatron-core 0.16.1 calls it unconditionally
  in ``strategies/filesystem_async.py`` (``preload_tensors``), ``strategies/fully_parallel.py``
  and ``strategies/async_utils.py``; on a CPU build of torch it raises.
- ``torch.cuda.current_device`` returns ``torch.device("cpu")``.  megatron-core uses it only
  as the ``device=`` of small flag tensors that are all-reduced / broadcast
  (``strategies/state_dict_saver.py`` ``save_state_dict_async_finalize``,
  ``strategies/async_utils.py``); on CPU those tensors then live on the CPU, which is what a
  gloo group needs.

One more, narrower still: :func:`tensor_cuda_is_identity` makes ``torch.Tensor.cuda`` return the
tensor itself, ONLY as a context manager around the construction of an mcore ``GPTModel`` with
tied embeddings and PP > 1: ``LanguageModule.setup_embeddings_and_output_layer`` does
``weight.data = weight.data.cuda()`` before all-reducing the tied embedding between the first
and last pipeline stage.  It is restored on exit.

And, for a forward pass only (the logits check in ``tests/test_realckpt_megatron.py``):
:func:`null_rng_tracker_fork` replaces the ``fork`` method of megatron's CUDA RNG tracker
*instance* with a null context inside the block (``DotProductAttention.forward`` enters
``get_cuda_rng_tracker().fork()`` around dropout unconditionally; with dropout 0 no random numbers
are drawn).  Restored on exit.

The shim is installed ONLY when ``torch.cuda.is_available()`` is False, ONLY inside the
processes that run megatron-core for test fixtures (the ``megatron_worker`` launcher and its
forked ranks, and the spawned load check in ``tests/test_realckpt_megatron.py``).  It is never
imported by ``ckptctl`` itself.  Nothing else in torch or megatron-core is patched by this
module: no other CUDA function, no megatron-core function.  ``uninstall()`` restores the
originals.  (Separately, and for speed only, ``megatron_worker._fork_results_queue`` pre-sets
one private megatron-core global -- the IPC queue of its file writers; see there.)
"""

from __future__ import annotations

import contextlib

_ORIGINALS: dict = {}


def _cpu_current_device():
    import torch

    return torch.device("cpu")


def _noop_synchronize(device=None) -> None:  # noqa: ARG001 - same signature as torch's
    return None


def install() -> bool:
    """Install the shim (idempotent).  Returns True when it is (now) active, False when
    CUDA is available and nothing was patched."""
    import torch

    if _ORIGINALS:
        return True
    if torch.cuda.is_available():
        return False
    _ORIGINALS["synchronize"] = torch.cuda.synchronize
    _ORIGINALS["current_device"] = torch.cuda.current_device
    torch.cuda.synchronize = _noop_synchronize
    torch.cuda.current_device = _cpu_current_device
    return True


def uninstall() -> None:
    """Restore the original ``torch.cuda`` functions (idempotent)."""
    import torch

    if not _ORIGINALS:
        return
    torch.cuda.synchronize = _ORIGINALS.pop("synchronize")
    torch.cuda.current_device = _ORIGINALS.pop("current_device")


def is_installed() -> bool:
    return bool(_ORIGINALS)


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """``torch.Tensor.cuda`` returns ``self`` inside the block (CPU only; a no-op context when
    CUDA is available).  Use only around mcore model construction, see the module doc."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda

    def _identity(self, *args, **kwargs):  # noqa: ARG001
        return self

    torch.Tensor.cuda = _identity
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def null_rng_tracker_fork():
    """Inside the block, megatron's CUDA RNG tracker ``fork()`` is a null context (CPU only)."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    had_own = "fork" in vars(tracker)
    own = vars(tracker).get("fork")
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        yield
    finally:
        if had_own:
            tracker.fork = own
        else:
            del tracker.fork


@contextlib.contextmanager
def cpu_cuda_shim():
    """Context manager form: install on entry, restore on exit (if it installed)."""
    installed_here = not _ORIGINALS and install()
    try:
        yield
    finally:
        if installed_here:
            uninstall()
