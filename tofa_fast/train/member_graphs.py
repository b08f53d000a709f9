"""A sandwich step replayed from CUDA graphs (the ``graphed`` step, :mod:`.step`).

Why: on a GPU the sequential step is bound by the host, not the device. On an H100 the ``ofa_mbv3``
128 px batch-32 bf16 step keeps the GPU busy 26 ms of its 233 ms, through about 5,000 kernel launches
(bench/results/step_profile_gpu_h100.json): Python, dispatch and launches take the rest. A CUDA
graph replays a recorded sequence of kernels with one launch. Graphs need the same computation on
same-shaped tensors at every replay:

* the sandwich rule gives two such members in every step, a_max and a_min (and a_max's pseudo-label
  pass): each is recorded whole, forward and backward, and replayed with two launches;
* the random members change every step, but their layers' configurations recur: a layer has a few
  kernel × expand × width choices. A random member runs its stem, every MBConv layer and the head
  from a recording of that part with those choices and that input shape (the backward into the
  part's input included), made the second time the configuration is met; once the first
  steps have met a layer's configurations, a random member costs a few launches per part (the
  forward and backward replays and the copies into their static inputs).

Recording stops — what has no recording yet runs eagerly — once the recordings have taken
:data:`RECORDINGS_MEMORY_SHARE` of the GPU's memory, or :data:`MAX_LAYER_RECORDINGS` layers.

How (:class:`MemberGraphs`): the first time a member or layer is met with a given *key* (the arch or
the layer's choices, the input's shape, dtype and strides, grad mode, autocast dtype, and every
switch the forward reads: train/eval, each batch norm's running-statistics flag, dropout and
drop-connect rates, the ops' pinned backends and dispatch path, the parameters' addresses), its
forward — and with gradients, the backward of its output into its parameters (and input) — is
recorded; later calls with the same key copy the input into the recording's static input and
replay. A layer's recording is replayed at most once per member, and each member's backward runs
before the next member's forward (the sequential step), so no replay overwrites activations that a
pending backward still needs. Recording runs warm-up passes (as ``torch.cuda.make_graphed_callables`` does) that
update batch-norm running statistics and draw dropout masks: the buffers and the RNG states are
saved before and restored after, so the graphed step trains exactly what the sequential step
trains. Replays update the running statistics inside the graph, as the eager pass does.

Gradients: a backward replay writes each parameter's gradient into a static buffer of the
recording. :class:`_Replay` hands autograd those buffers themselves (not detached aliases, as
``make_graphed_callables`` does), so autograd copies them into a ``.grad`` that is None instead of
adopting them, and the next replay cannot overwrite a gradient that is being accumulated (gradient
accumulation across steps, ``zero_grad(set_to_none=False)``).

Two recorders implement the same contract (static input, static outputs that every replay
overwrites, an autograd graph to record the backward from): :class:`CudaGraphRecorder`, and
:class:`EagerRecorder`, which re-runs the functions at every replay and copies their results into
the static outputs. The latter makes everything above except the capture itself testable on a CPU
(tests/test_member_graphs.py); the capture is tested on a GPU (``-m gpu``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..nn.elastic_batchnorm import ElasticBatchNorm2d
from ..ops import elastic_dwconv_dispatch, packed_batch_norm
from ..ops.eager_path import takes_eager_path
from ..spaces import Arch

#: whole-member recordings kept per network (least recently used dropped first): a_max, a_min and
#: the pseudo-label pass, at the epoch's full and last batch sizes, with room to spare
MAX_RECORDINGS = 8
#: layer recordings per network (made on a configuration's second sighting, never dropped; once full,
#: new configurations run eagerly): ofa_mbv3 at one resolution has 20 layers × 9 kernel-expand
#: choices, and one head
MAX_LAYER_RECORDINGS = 512
#: recording stops (what is not recorded yet runs eagerly) once recordings have grown the device's
#: allocator by this share of its memory: a space with large, many-shaped layers (elastic resolution
#: and widths at 224 px) would otherwise fill the GPU with recorded activations
RECORDINGS_MEMORY_SHARE = 0.3
#: forward (+ backward) passes run before recording: lazy initialisation (cuDNN and cuBLAS plans,
#: Triton compiles, the caching allocator) must not happen inside a capture
WARMUP_PASSES = 2

Outputs = tuple[torch.Tensor | None, ...]


# ------------------------------------------------------------------------------------------------
# Recorders: record a function's device work once, replay it
# ------------------------------------------------------------------------------------------------


class Recording:
    """One recorded function: :meth:`replay` makes :attr:`outputs` (static tensors) hold its result for
    the current contents of its static inputs. :attr:`live` is what a backward recording
    differentiates: the outputs as autograd knows them from the latest run of the function."""

    outputs: Outputs
    live: Outputs

    def replay(self) -> None:
        raise NotImplementedError


class CudaGraphRecorder:
    """CUDA graphs: warm-up passes and captures run on a side stream; the forward and backward of one
    member share a memory pool (captured and replayed in that order), members do not."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.memory_budget = int(RECORDINGS_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory)

    def memory_in_use(self) -> int:
        """Device memory held by the caching allocator, graph pools included: a recording's cost is
        the growth across it (warm-up allocations that stay cached count too: an upper bound)."""
        return torch.cuda.memory_reserved(self.device)

    def warm_up(self, fn: Callable[[], Any]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_PASSES):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def record(self, fn: Callable[[], Outputs], after: Recording | None = None) -> Recording:
        graph = torch.cuda.CUDAGraph()
        pool = after.graph.pool() if isinstance(after, _CudaRecording) else None
        torch.cuda.synchronize(self.device)
        # thread_local: another thread of the process (a loader's, the user's) may make CUDA calls
        # that a capture forbids process-wide (as torch.compile's CUDA graphs capture)
        with torch.cuda.graph(graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"):
            outputs = tuple(fn())
        return _CudaRecording(graph, outputs)


class _CudaRecording(Recording):
    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Outputs):
        # The captured outputs are both: static memory, and the autograd graph the capture built.
        self.graph, self.outputs, self.live = graph, outputs, outputs

    def replay(self) -> None:
        self.graph.replay()


class EagerRecorder:
    """Records nothing: every replay re-runs the function and copies its results into the static
    outputs. The :class:`CudaGraphRecorder`'s contract on any device, to test the rest on a CPU."""

    def __init__(self, memory_budget: int | None = None):
        self.memory_budget = memory_budget
        self._static_bytes = 0

    def memory_in_use(self) -> int:
        """The bytes of the static outputs it holds (what a graph's pool holds beyond them, the
        activations, has no counterpart here)."""
        return self._static_bytes

    def warm_up(self, fn: Callable[[], Any]) -> None:
        for _ in range(WARMUP_PASSES):
            fn()

    def record(self, fn: Callable[[], Outputs], after: Recording | None = None) -> Recording:
        recording = _EagerRecording(fn)
        self._static_bytes += sum(t.numel() * t.element_size() for t in recording.outputs if t is not None)
        return recording


class _EagerRecording(Recording):
    def __init__(self, fn: Callable[[], Outputs]):
        self.fn = fn
        # A graph keeps the grad mode and autocast state it was captured in; a re-execution restores
        # them (a replay is called from an autograd Function, where grad mode is off).
        self.grad = torch.is_grad_enabled()
        self.autocast = [
            (device, torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)
        ]
        # A capture runs the function's Python once, as this does; what it computes is overwritten
        # by the first replay (the caller restores any state it changed).
        self.live = tuple(fn())
        self.outputs = tuple(None if t is None else t.detach().clone() for t in self.live)

    def replay(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(self.grad))
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=False))
            self.live = tuple(self.fn())
        for static, new in zip(self.outputs, self.live):
            if static is not None:
                static.copy_(new.detach())


# ------------------------------------------------------------------------------------------------
# A recorded forward (x → one tensor), and its backward
# ------------------------------------------------------------------------------------------------


class _Replay(torch.autograd.Function):
    """A training recording as one autograd node: forward = the forward replay, backward = the
    backward replay (module docstring for why the static gradient buffers are returned as they are)."""

    @staticmethod
    def forward(ctx, recording: TrainingRecording, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        recording.load(x)
        recording.forward.replay()
        ctx.recording = recording
        return recording.forward.outputs[0].detach()  # static: valid until this recording's next replay

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        recording = ctx.recording
        recording.grad_out.copy_(grad_out)
        recording.backward.replay()
        grads = recording.backward.outputs
        if recording.input_grad:
            return (None, *grads)
        return (None, None, *grads)


class TrainingRecording:
    """A forward (x → one tensor) and the backward of its output into ``params`` (and into x when
    ``input_grad``: a layer inside a member)."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        params: Sequence[torch.Tensor],
        x: torch.Tensor,
        recorder,
        input_grad: bool = False,
    ):
        self.params, self.input_grad = tuple(params), input_grad
        self.static_x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(input_grad)
        inputs = ((self.static_x,) if input_grad else ()) + self.params

        def forward_backward():
            out = forward(self.static_x)
            torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

        recorder.warm_up(forward_backward)
        self.forward = recorder.record(lambda: (forward(self.static_x),))
        self.grad_out = torch.empty_like(self.forward.outputs[0])
        self.backward = recorder.record(
            lambda: torch.autograd.grad(self.forward.live[0], inputs, self.grad_out, allow_unused=True),
            after=self.forward,
        )

    def load(self, x: torch.Tensor) -> None:
        if x.data_ptr() != self.static_x.data_ptr():
            with torch.no_grad():
                self.static_x.copy_(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _Replay.apply(self, x, *self.params)


class InferenceRecording:
    """A member's forward without gradients (the pseudo-label pass)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], x, recorder):
        self.static_x = x.detach().clone(memory_format=torch.preserve_format)
        recorder.warm_up(lambda: forward(self.static_x))
        self.forward = recorder.record(lambda: (forward(self.static_x),))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() != self.static_x.data_ptr():
            self.static_x.copy_(x)
        self.forward.replay()
        return self.forward.outputs[0].clone()  # the caller's: the next replay overwrites the static one


# ------------------------------------------------------------------------------------------------
# A network's recordings
# ------------------------------------------------------------------------------------------------


class MemberGraphs:
    """The recordings of one supernet (module docstring): whole members for a_max and a_min, and
    layer by layer for the others (:meth:`layerwise`)."""

    def __init__(self, net, recorder):
        # Held weakly (here and in the recorded closures): the step's cache is keyed by the network.
        self._net, self.recorder = weakref.ref(net), recorder
        space = net.space
        self._recurring = {_structure(space.max_arch()), _structure(space.min_arch())}
        self._bns = [m for m in net.modules() if isinstance(m, ElasticBatchNorm2d)]
        self._layers = [layer for stage in net.stages for layer in stage]
        # looked up at every replay (the host's time is what the graphed step saves)
        self._layer_bns = {
            id(layer): [m for m in layer.modules() if isinstance(m, ElasticBatchNorm2d)] for layer in self._layers
        }
        self._head = [net.final_expand_conv, net.final_expand_bn, net.feature_mix_conv, net.classifier]
        self._members: OrderedDict[tuple, TrainingRecording | InferenceRecording] = OrderedDict()
        self._layer_recordings: OrderedDict[tuple, TrainingRecording] = OrderedDict()
        self._sightings: dict[tuple, int] = {}  # layer keys met without a recording
        #: what the recordings have cost in memory (the recorder's measure; not returned when the
        #: least recently used member recording is dropped: an upper bound)
        self.recording_bytes = 0
        #: recordings made so far (the tests count them: a replay must not record again)
        self.recorded = 0

    @property
    def net(self):
        return self._net()

    def recurs(self, arch: Arch) -> bool:
        """Whether ``arch`` is one of the members that every step has (a_max, a_min), at any resolution."""
        return _structure(arch) in self._recurring

    def __call__(self, arch: Arch, x: torch.Tensor) -> torch.Tensor:
        """The logits of ``arch`` on ``x``, the whole member from one recording (made now if there is
        none for this key). With gradients enabled, the result is valid until the same member is
        replayed again: call backward (or drop the result) before that."""
        net = self.net
        switches = (
            net.training,
            net.dropout.p,
            tuple(layer.drop_connect_rate for layer in self._layers),
            tuple((bn.training, bn.update_running_stats) for bn in self._bns),
            _addresses(net.parameters()),
        )
        key = (_structure(arch), *_call_key(x), switches)

        def forward(images: torch.Tensor) -> torch.Tensor:
            member = self._net()
            member.set_active(arch)
            return member(images)

        recording = self._recording(self._members, MAX_RECORDINGS, key, [net], forward, x)
        return recording(x) if recording is not None else forward(x)

    def layerwise(self, arch: Arch, x: torch.Tensor) -> torch.Tensor:
        """The logits of ``arch`` on ``x`` (with gradients): the stem, each MBConv layer and the head
        replayed from a recording of that part with its active choices and input shape.

        A member changes every step, its layers' configurations recur: a layer has a few kernel ×
        expand × width choices, so after the first steps every layer of a random member is a
        replay. Safe in the sequential step, where each member's backward runs before the next
        member's forward: a layer is replayed at most once per member."""
        net = self.net
        net.set_active(arch)
        # Supernet.forward, part by part replayed (tests compare the two bit for bit)
        y = self._replay_stem(arch.stem, x)
        for layers, stage_arch in zip(net.stages, arch.stages):
            for layer in layers[: stage_arch.depth]:
                y = self._replay_layer(layer, y)
        return self._replay_head(arch.head, y)

    def _replay_stem(self, width: int, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        modules = [net.stem_conv, net.stem_bn]
        bn = net.stem_bn
        switches = (bn.training, bn.update_running_stats, _addresses(p for m in modules for p in m.parameters()))
        key = ("stem", width, *_call_key(x), switches)
        net_ref = self._net

        def forward(t: torch.Tensor) -> torch.Tensor:
            n = net_ref()
            return n.stem_bn(n.stem_conv(t, width), n.stem_act)

        recording = self._layer_recording(key, modules, forward, x)
        return recording(x) if recording is not None else forward(x)

    def _replay_layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        choices = (layer.active_kernel, layer.active_expand, layer.active_width)
        bns = self._layer_bns[id(layer)]
        switches = (
            layer.training,
            layer.drop_connect_rate,
            tuple((bn.training, bn.update_running_stats) for bn in bns),
            _addresses(layer.parameters()),
        )
        key = ("layer", id(layer), choices, *_call_key(x), switches)

        def forward(t: torch.Tensor) -> torch.Tensor:
            layer.set_active(*choices)
            return layer(t)

        recording = self._layer_recording(key, [layer], forward, x)
        return recording(x) if recording is not None else layer(x)

    def _replay_head(self, head_width: int, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        params = [p for module in self._head if module is not None for p in module.parameters()]
        bn = net.final_expand_bn
        switches = (net.training, net.dropout.p, bn.training, bn.update_running_stats, _addresses(params))
        key = ("head", head_width, *_call_key(x), switches)
        net_ref = self._net

        def forward(t: torch.Tensor) -> torch.Tensor:
            return net_ref().classify(t, head_width)

        recording = self._layer_recording(key, self._head, forward, x)
        return recording(x) if recording is not None else forward(x)

    def _layer_recording(self, key: tuple, modules, forward, x) -> TrainingRecording | None:
        """A part's (stem, layer, head) recording for ``key``; None (run it eagerly) the first time a key
        is met — a configuration met once may never recur — and once the table is full or the
        recordings' memory reaches the recorder's budget: a space with more configurations than fit
        runs the rest eagerly rather than record over and over, or run out of memory."""
        if key not in self._layer_recordings:
            if len(self._sightings) >= 16 * MAX_LAYER_RECORDINGS:  # a space of many configurations
                self._sightings.clear()
            seen = self._sightings[key] = self._sightings.get(key, 0) + 1
            if seen < 2 or len(self._layer_recordings) >= MAX_LAYER_RECORDINGS:
                return None
        # the images need no gradient; a layer's input does
        recording = self._recording(
            self._layer_recordings, MAX_LAYER_RECORDINGS, key, modules, forward, x, x.requires_grad
        )
        if recording is not None:
            self._sightings.pop(key, None)
        return recording

    def _recording(self, cache: OrderedDict, bound: int, key: tuple, modules, forward, x, input_grad=False):
        """The recording of ``forward`` (which runs ``modules``) for ``key``, made now if there is none
        — unless the recordings have reached the recorder's memory budget: None (run it eagerly)."""
        recording = cache.get(key)
        if recording is None:
            budget = self.recorder.memory_budget
            if budget is not None and self.recording_bytes >= budget:
                return None
            before = self.recorder.memory_in_use()
            net = self.net
            with _state_restored(net, modules, x.device), _without_autocast_cache(x.device.type):
                if torch.is_grad_enabled():
                    params = [p for m in modules if m is not None for p in m.parameters()]
                    trained = [p for p in params if p.requires_grad]
                    recording = TrainingRecording(forward, trained, x, self.recorder, input_grad)
                else:
                    recording = InferenceRecording(forward, x, self.recorder)
            self.recording_bytes += max(0, self.recorder.memory_in_use() - before)
            self.recorded += 1
            cache[key] = recording
            while len(cache) > bound:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return recording


def _call_key(x: torch.Tensor) -> tuple:
    """What a recording depends on besides its module: the input's shape, layout and dtype, grad
    mode, autocast, and which kernels the ops' calls reach (pinned backends, dispatch path)."""
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (
        tuple(x.shape),
        x.stride(),
        x.dtype,
        x.requires_grad,
        torch.is_grad_enabled(),
        autocast,
        elastic_dwconv_dispatch.BACKEND_TABLE.pinned_backend(),
        packed_batch_norm.BACKEND_TABLE.pinned_backend(),
        takes_eager_path(),
    )


def _addresses(params) -> tuple:
    return tuple((p.data_ptr(), p.requires_grad) for p in params)


def _structure(arch: Arch) -> str:
    """An arch without its resolution (the key carries the images' shape)."""
    d = arch.to_dict()
    d.pop("resolution", None)
    return repr(sorted(d.items()))


@contextlib.contextmanager
def _state_restored(net, modules, device: torch.device):
    """Around a recording of ``modules``: the warm-up passes' running-statistics updates and RNG draws
    undone. Only the recorded modules' buffers are written back: autograd saves other layers'
    running statistics for the backward of a member whose forward is under way (batch norm's
    backward takes them), and a write would make them stale in its eyes."""
    buffers = [(b, b.clone()) for m in modules if m is not None for b in m.buffers()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    active = net.active_arch
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        net.set_active(active)


def _without_autocast_cache(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast's cache of cast weights lives outside the graph's memory and is freed when the
    caller's autocast region ends: a recording must cast inside itself (``make_graphed_callables``
    has the same rule)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)
