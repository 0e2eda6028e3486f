"""Byte accounting of a program run, tensor storage by tensor storage, as a GPU would hold it.

:class:`MemoryTracker` is a ``TorchDispatchMode``: it sees every aten op (forward, backward, checkpoint
recomputation; real and fake tensors alike), records each new storage among an op's outputs at the size the
CUDA caching allocator would hand out (rounded up to 512 bytes, ``round_size`` in PyTorch's
c10/cuda/CUDACachingAllocator.cpp) and frees it when the storage dies (torch keeps one Python object per
storage, so a weak reference to it fires exactly then). The live total after each op is the "allocated"
curve; its maximum, the phase it fell in and the live set at that moment are the peak. Limits: what a
kernel allocates inside itself (cuBLAS/cuDNN workspaces, flash-attention scratch) is not an output and is
not seen (fixed costs, ``allocator.py``); storages marked as host memory are counted apart. FSDP2 frees and
re-allocates its gathered parameters by resizing their storages in place (``UntypedStorage.resize_``, not an
aten op): while the mode is active that method reports to the tracker. A DTensor is counted by its local
shard (the storage this rank holds).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flowbp_train.memory.allocator import round_size

#: Categories of the report, in print order. Roles set by :meth:`MemoryTracker.tag` win; the rest is
#: classified by how it was allocated (forward with grad: activations; forward re-run inside a backward:
#: recomputation; anything else: temporaries).
CATEGORIES = ("frozen weights", "text encoders", "trainable weights", "gradients", "optimizer state", "EMA",
              "rollout cache", "gathered weights", "reduce buffers", "activations", "recomputation",
              "temporaries")
_ALLOC, _FREE, _RELEASE = 0, 1, 2  # _RELEASE: torch.cuda.empty_cache() (no allocation id, size 0)
_aten = torch.ops.aten


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding storage: a DTensor's local shard, else ``t``."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def _has_tensor(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) for t in tree_leaves((args, kwargs)))


_ORIG_RESIZE = torch.UntypedStorage.resize_
_ACTIVE: list[MemoryTracker] = []  # trackers whose mode is entered, innermost last


def _tracked_resize(storage, size):
    out = _ORIG_RESIZE(storage, size)
    for tr in _ACTIVE:
        tr._resized(storage)
    return out


@dataclass
class Peak:
    """The high-water mark: bytes, the phase it fell in, and the index of the event that reached it."""

    bytes: int = 0
    phase: str = ""
    event: int = -1


@dataclass
class Trace:
    """What one tracked run leaves behind (device allocations only; host ones are summed apart).

    Attributes:
        events: ``(kind, alloc_id, size)`` in program order; kind 0 = allocate, 1 = free, 2 = the
            allocator's cached segments released (``torch.cuda.empty_cache()``; id -1, size 0).
        kinds: ``alloc_id -> category`` (see ``CATEGORIES``).
        phases: ``alloc_id -> phase`` in which it was allocated.
        peak: the device peak of the live bytes.
        phase_peaks: the highest live bytes seen during each phase.
        host_peak: the high-water mark of the bytes marked as host memory.
        start_bytes: live device bytes when the trace was started (``MemoryTracker.restart``).
    """

    events: list[tuple[int, int, int]] = field(default_factory=list)
    kinds: dict[int, str] = field(default_factory=dict)
    phases: dict[int, str] = field(default_factory=dict)
    peak: Peak = field(default_factory=Peak)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    host_peak: int = 0
    start_bytes: int = 0

    def live_at(self, event: int) -> dict[int, int]:
        """``alloc_id -> size`` of every device allocation live just after event ``event``."""
        live: dict[int, int] = {}
        for kind, aid, size in self.events[: event + 1]:
            if kind == _ALLOC:
                live[aid] = size
            else:
                live.pop(aid, None)
        return live

    def breakdown(self, event: int | None = None) -> dict[str, int]:
        """Bytes by category live just after ``event`` (default: at the peak)."""
        live = self.live_at(self.peak.event if event is None else event)
        out = dict.fromkeys(CATEGORIES, 0)
        for aid, size in live.items():
            out[self.kinds.get(aid, "temporaries")] += size
        return out


class _Alloc:
    __slots__ = ("aid", "size", "raw", "host", "ref")

    def __init__(self, aid: int, size: int, raw: int, host: bool):
        self.aid, self.size, self.raw, self.host, self.ref = aid, size, raw, host, None


class MemoryTracker(TorchDispatchMode):
    """Account every tensor storage the program allocates while the mode is active.

    Use as a context manager around the whole program (module construction included), call
    :meth:`restart` where the measured part begins (the live set at that moment is kept), set
    :attr:`phase` as the program moves on, and read :attr:`trace`. ``neutral_scalars``: answer
    ``.item()`` / ``float()`` / ``bool()`` on a fake tensor with a neutral value (True, 1, 1.0) instead
    of raising, so a program whose control flow only checks finiteness runs on.
    """

    def __init__(self, *, neutral_scalars: bool = True):
        super().__init__()
        self.neutral_scalars = neutral_scalars
        #: while set, new allocations get this category (FSDP2's gathered weights, reduce buffers)
        self.region: str | None = None
        #: while ``_fake_depth`` > 0, ops without tensor inputs (factories) run under this FakeTensorMode, so
        #: buffers a library allocates for itself during a fake run are fake too (see ``fake_factories``)
        self.fake_mode = None
        self._fake_depth = 0
        self._muted = 0  # > 0: new storages are not counted (replay attaches them itself)
        self.live: dict[int, _Alloc] = {}  # storage address -> allocation
        self.trace = Trace()
        self.phase = "setup"
        self.allocated = 0
        self.host_allocated = 0
        self._next_id = 0
        self._host_depth = 0
        self._roles: dict[int, str] = {}  # alloc_id -> role, set by tag()

    # ------------------------------------------------------------------ dispatch
    def __enter__(self):
        out = super().__enter__()
        _ACTIVE.append(self)
        if len(_ACTIVE) == 1:
            torch.UntypedStorage.resize_ = _tracked_resize
        return out

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        if not _ACTIVE:
            torch.UntypedStorage.resize_ = _ORIG_RESIZE
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default and self.neutral_scalars and _is_fake(args[0]):
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() or t.is_complex() else 1)
        if self._fake_depth and self.fake_mode is not None and not _has_tensor(args, kwargs):
            with self.fake_mode:
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if not self._muted:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._see(t)
        return out

    def _resized(self, st) -> None:
        """A storage was resized in place: free what it held, count what it holds now."""
        key = st._cdata
        if key in self.live:
            self._free(key)
        raw = st.nbytes()
        if raw:
            self._new(key, st, raw)

    def _see(self, t: torch.Tensor) -> None:
        t = _local(t)
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / storage-less tensors
            return
        key = st._cdata
        a = self.live.get(key)
        raw = st.nbytes()
        if a is not None:
            if raw != a.raw:  # resized in place (resize_, set_)
                self._free(key)
            else:
                return
        if raw == 0:
            return
        self._new(key, st, raw)

    def _new(self, key: int, st, raw: int) -> None:
        aid = self._next_id
        self._next_id += 1
        a = _Alloc(aid, round_size(raw), raw, self._host_depth > 0)
        a.ref = weakref.ref(st, lambda _r, k=key, i=aid: self._on_death(k, i))
        self.live[key] = a
        grad_task = torch._C._current_graph_task_id() != -1
        if self.region is not None:
            kind = self.region
        elif torch.is_grad_enabled():
            kind = "recomputation" if grad_task else "activations"
        else:
            kind = "temporaries"
        self.trace.kinds[aid] = kind
        self.trace.phases[aid] = self.phase
        if a.host:
            self.host_allocated += a.size
            self.trace.host_peak = max(self.trace.host_peak, self.host_allocated)
            return
        self.allocated += a.size
        self.trace.events.append((_ALLOC, aid, a.size))
        self._note_peak()

    def _on_death(self, key: int, aid: int) -> None:
        a = self.live.get(key)
        if a is not None and a.aid == aid:
            self._free(key)

    def _free(self, key: int) -> None:
        a = self.live.pop(key)
        if a.host:
            self.host_allocated -= a.size
        else:
            self.allocated -= a.size
            self.trace.events.append((_FREE, a.aid, a.size))

    # ------------------------------------------------------------------ control
    def restart(self) -> None:
        """Start a fresh trace: the live device allocations become its first events, the peak is reset."""
        kinds = self.trace.kinds
        phases = self.trace.phases
        self.trace = Trace(kinds=kinds, phases=phases, start_bytes=self.allocated)
        for a in self.live.values():
            if not a.host:
                self.trace.events.append((_ALLOC, a.aid, a.size))
        self.trace.peak = Peak(self.allocated, self.phase, len(self.trace.events) - 1)
        self.trace.phase_peaks = {self.phase: self.allocated}
        self.trace.host_peak = self.host_allocated

    @contextlib.contextmanager
    def on_host(self) -> Iterator[None]:
        """Allocations made inside are host (CPU) memory: counted apart from the device."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        prev, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = prev

    @contextlib.contextmanager
    def in_region(self, kind: str | None, *, fake_factories: bool = False) -> Iterator[None]:
        """Allocations made inside get the category ``kind`` (None: by how they were made); with
        ``fake_factories`` (and :attr:`fake_mode` set), tensors created from nothing are fake."""
        prev = self.region
        self.region = kind
        self._fake_depth += fake_factories
        try:
            yield
        finally:
            self.region = prev
            self._fake_depth -= fake_factories

    def _lookup(self, t) -> _Alloc | None:
        t = _local(t)
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        return self.live.get(st._cdata)

    def tag(self, tensors: Iterable, role: str) -> None:
        """Give the storages of ``tensors`` (live ones) the category ``role``."""
        if role not in CATEGORIES:
            raise ValueError(f"role: expected one of {CATEGORIES}, got {role!r}")
        for t in tensors:
            if isinstance(t, torch.Tensor):
                a = self._lookup(t)
                if a is not None:
                    self.trace.kinds[a.aid] = role

    def release_cached(self) -> None:
        """``torch.cuda.empty_cache()`` in a real run: the allocator replay returns its free segments."""
        self.trace.events.append((_RELEASE, -1, 0))

    def move_to_host(self, tensors: Iterable) -> None:
        """The storages of ``tensors`` leave the device (``module.to("cpu")`` in a real run)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            a = self._lookup(t)
            if a is not None and not a.host:
                self.allocated -= a.size
                self.trace.events.append((_FREE, a.aid, a.size))
                a.host = True
                self.host_allocated += a.size
                self.trace.host_peak = max(self.trace.host_peak, self.host_allocated)

    def move_to_device(self, tensors: Iterable) -> None:
        """The storages of ``tensors`` come onto the device (``module.to("cuda")``: a text encoder placed
        to encode prompts)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            a = self._lookup(t)
            if a is not None and a.host:
                a.host = False
                self.host_allocated -= a.size
                self.allocated += a.size
                self.trace.events.append((_ALLOC, a.aid, a.size))
                self.trace.phases[a.aid] = self.phase
                self._note_peak()

    def _note_peak(self) -> None:
        if self.allocated > self.trace.peak.bytes:
            self.trace.peak = Peak(self.allocated, self.phase, len(self.trace.events) - 1)
        pp = self.trace.phase_peaks
        if self.allocated > pp.get(self.phase, -1):
            pp[self.phase] = self.allocated

    def bytes_of(self, tensors: Iterable) -> int:
        """Device bytes of the distinct live storages of ``tensors``."""
        seen, total = set(), 0
        for t in tensors:
            a = self._lookup(t) if isinstance(t, torch.Tensor) else None
            if a is not None and not a.host and a.aid not in seen:
                seen.add(a.aid)
                total += a.size
        return total

    # ------------------------------------------------------------------ replay of a recorded call
    @contextlib.contextmanager
    def recording(self) -> Iterator[list]:
        """Collect the device events of the enclosed code into the yielded list (filled on exit)."""
        events: list = []
        start = len(self.trace.events)
        try:
            yield events
        finally:
            events.extend(self.trace.events[start:])

    def replay(self, events: list, out_ids: list, make_outputs, args: dict | None = None,
               kinds: dict[int, str] | None = None):
        """Emit ``events`` (from :meth:`recording`) again with fresh ids, as if the recorded call ran once
        more, then attach the tensors ``make_outputs()`` returns to the allocations of ``out_ids`` (the
        recorded outputs, still live at its end). ``args``: recorded alloc id -> the tensor now in that
        argument's place; a recorded free of an argument (its last reference dropped inside the call)
        frees the current one at the same point. Other frees of allocations older than the call are skipped.
        ``kinds``: recorded alloc id -> category (default: this trace's own, for a call recorded here)."""
        kinds = self.trace.kinds if kinds is None else kinds
        idmap: dict[int, int] = {}
        argkeys = {aid: t.untyped_storage()._cdata for aid, t in (args or {}).items()}
        for kind, aid, size in events:
            if kind == _ALLOC:
                new = self._next_id
                self._next_id += 1
                idmap[aid] = new
                self.live[("virtual", new)] = _Alloc(new, size, size, False)
                self.trace.kinds[new] = kinds.get(aid, "temporaries")
                self.trace.phases[new] = self.phase
                self.allocated += size
                self.trace.events.append((_ALLOC, new, size))
                self._note_peak()
            elif aid in idmap:
                self._free(("virtual", idmap[aid]))
            elif aid in argkeys and argkeys[aid] in self.live and not self.live[argkeys[aid]].host:
                self._free(argkeys.pop(aid))
        self._muted += 1  # the fresh outputs take the replayed allocations: not counted again
        try:
            outs = make_outputs()
        finally:
            self._muted -= 1
        for t, aid in zip(outs, out_ids):
            new = idmap.get(aid) if aid is not None else None
            a = self.live.pop(("virtual", new), None) if new is not None else None
            st = t.untyped_storage()
            if a is None:
                self._see(t)
                continue
            key = st._cdata
            a.raw = st.nbytes()
            a.ref = weakref.ref(st, lambda _r, k=key, i=a.aid: self._on_death(k, i))
            self.live[key] = a
        fresh = set(idmap.values())
        for key in [k for k in self.live if isinstance(k, tuple) and k[1] in fresh]:
            self._free(key)  # recorded allocations that outlived the call but are not outputs
        return outs
