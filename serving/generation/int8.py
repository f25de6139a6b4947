"""Int8 linear layers for CPU decoding whose output for a row does not depend on the other rows.

Decoding on CPU is memory-bound (fp32 SmolLM2-135M reads 538 MB per token); int8 weights read a quarter
of that. fbgemm's ``quantized::linear_dynamic`` (what ``torch.ao.quantization.quantize_dynamic`` builds)
quantizes the activations with ONE scale and zero point for the whole input tensor, so a row's result
changes with whatever else is in the batch (measured: up to 2.1 absolute on a 576x1536 layer), and a
batched greedy answer would differ from the same request decoded alone.

:class:`Int8Linear` makes the quantization per row while keeping the one fbgemm call (one read of the
weights for the whole batch): each row's [min, max] is mapped onto [-1, 1] (``z = (x - mid) / half``),
and two constant inputs +1 and -1 are appended (their weight columns are zero, so they add nothing), so
every row, alone or in any batch, spans exactly [-1, 1]: the tensor-wide range, hence the quantization,
is the same for every row, the integer products are exact, and the map is undone per row afterwards
(``W x = half * W z + mid * W 1``). The mapping is asymmetric on purpose: a symmetric one (divide by the
largest magnitude, fewer operations) wastes half the int8 levels on one-sided activations (after SiLU)
and cut the dev answers correct from 20.8% to 8.3% (24 rows); this one gave 25.0%. The mapping of an
input is shared by q/k/v and gate/up, which read the same tensor.

Layers that read the same input in one block (q/k/v of an attention, gate/up of an MLP) are packed into
ONE int8 matrix (:class:`Int8Slice` members return their columns of its output): the per-channel scales
and the per-row mapping are those of the separate layers, so the outputs are the same bits, with one
fbgemm call instead of three (two). On a 2-core AVX-512 machine a decode step is bound by the number of
operators more than by the bytes read (measured: the int8 step's operators sum to 29 ms of a 50 ms step);
the packing saves ~60 us per attention and ~30 us per MLP a step at one row.

A decode step (one position per row, the engine's hot loop) takes another kernel: the same int8 values,
kept row-major (``weight_int8``), multiplied by ``torch._weight_int8pack_mm`` with the activations in bf16
(8 significant bits per element, against the mapping's 7 bits of the row's range) and bf16 per-channel
scales: one operation per layer input instead of the mapping's ~8, and each output row depends on its
input row alone (tested: bit-equal alone and in batches of 2-8 rows). Layer microbench on a 2-core AMD
EPYC (AVX2), one row, us per call, mapped fbgemm / int8 x bf16: q/k/v 304 / 77, o 238 / 46, gate/up 302 /
259, down 259 / 109; at 8 rows about equal (2.16 / 2.13 ms per layer set). The 49k-column output head stays
on fbgemm (2.9 ms against 5.3 ms at one row) and keeps no row-major copy. The copies cost another
~106 MB for SmolLM2-135M (the fbgemm packing is still used for prompts).

Prompt prefill is a different shape: hundreds of rows per call, compute-bound, not operator-bound. On CPUs
that multiply bf16 in hardware (AMX-BF16, AVX512-BF16) a bf16 copy of each weight can be kept
(``keep_bf16``), and inside :func:`bf16_matmuls` the layers multiply in bf16 with those copies instead
(fp32 in and out; attention, norms and the KV cache stay fp32). Measured on a 2-core Xeon with AMX (whole
prompt, best of 3): 130 / 256 / 1,000 tokens in 0.148 / 0.245 / 1.136 s int8, 0.092 / 0.152 / 0.586 s
bf16 (fp32: 0.179 / 0.287 / 1.119 s), and the bf16 logits are nearer fp32's than int8's (tested). Inputs
of fewer than :data:`BF16_MIN_ROWS` rows stay int8, and the output head, which sees one position, keeps
no copy (it would be 57 of the ~270 MB for SmolLM2-135M). The engine
prefills each request alone, so the choice does not couple rows of a batch; decode steps are int8.

Subclasses of ``nn.Linear`` so LoRA wrappers find ``in_features``/``out_features`` (the LoRA matrices stay
in floating point). Greedy text differs slightly from fp32; ``quantize=none`` turns it off.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

_last = threading.local()  # the last input and its mapped form (and a packed group's output for that input)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling layers that read one input
BF16_MIN_ROWS = 16  # fewer rows (the output head's one position, a short last slice) stay int8: bf16 is no faster there


@contextlib.contextmanager
def bf16_matmuls(on: bool = True):
    """Inside (this thread): layers that kept a bf16 weight copy multiply in bf16 with it."""
    previous = getattr(_last, "bf16", False)
    _last.bf16 = on
    try:
        yield
    finally:
        _last.bf16 = previous


def _int8_linear_class():
    import torch
    from torch import nn

    class Int8Linear(nn.Linear):
        """Int8 per-channel weights, activations quantized per row (see the module docstring)."""

        def __init__(self, linear: nn.Linear, keep_bf16: bool = False, decode_weights: bool = False) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            w = linear.weight.detach().float()
            scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
            zeros = torch.zeros(w.shape[0], dtype=torch.long)
            padded = torch.cat([w, torch.zeros(w.shape[0], 2, dtype=w.dtype, device=w.device)], dim=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in favour of torchao
                qweight = torch.quantize_per_channel(padded, scales, zeros, 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.register_buffer("ends", torch.tensor([1.0, -1.0], device=w.device), persistent=False)
            self.register_buffer("row_sums", qweight.dequantize().sum(dim=1), persistent=False)
            self.register_buffer("bias_", linear.bias.detach().float() if linear.bias is not None else None,
                                 persistent=False)
            self.register_buffer("weight_bf16", w.to(torch.bfloat16) if keep_bf16 else None, persistent=False)
            # decode steps (one position per row): the same int8 values, row-major, bf16 activations (see the docstring)
            self.register_buffer("weight_int8", qweight.int_repr()[:, :-2].contiguous() if decode_weights else None,
                                 persistent=False)
            self.register_buffer("scales_bf16", scales.to(torch.bfloat16) if decode_weights else None, persistent=False)
            # an empty fp32 weight only tells peft the device and dtype for the adapter weights
            self.register_buffer("weight", torch.empty(0, dtype=torch.float32, device=w.device), persistent=False)
            self.bias = None

        def forward(self, x):  # type: ignore[override]
            if self.weight_bf16 is not None and getattr(_last, "bf16", False) and x.numel() >= BF16_MIN_ROWS * x.shape[-1]:
                flat = torch.mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight_bf16.t())  # 2-D: no bmm copy
                out = flat.float().view(*x.shape[:-1], self.out_features)
                return out if self.bias_ is None else out.add_(self.bias_)
            if self.weight_int8 is not None and x.dim() == 3 and x.shape[1] == 1:  # a decode step
                flat = torch._weight_int8pack_mm(x.reshape(x.shape[0], -1).to(torch.bfloat16), self.weight_int8, self.scales_bf16)
                out = flat.float().view(x.shape[0], 1, self.out_features)
                return out if self.bias_ is None else out.add_(self.bias_)
            mapped = getattr(_last, "mapped", None)
            if mapped is not None and mapped[0] is x:  # the same tensor object (held, so its id is not reused)
                _, z, half, mid = mapped
            else:
                lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
                half = (hi - lo).mul_(0.5).clamp_(min=1e-30)
                mid = (hi + lo).mul_(0.5)
                z = torch.cat([((x - mid) / half).clamp_(-1.0, 1.0), self.ends.expand(*x.shape[:-1], 2)], dim=-1)
                _last.mapped = (x, z, half, mid)
            # reduce_range as quantize_dynamic does on x86, so the int8 products never saturate
            out = torch.addcmul(torch.ops.quantized.linear_dynamic(z, self._packed, True).mul_(half), mid, self.row_sums)
            return out if self.bias_ is None else out.add_(self.bias_)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"

    return Int8Linear


def _int8_slice_class():
    import torch
    from torch import nn

    class Int8Slice(nn.Linear):
        """Columns ``lo:hi`` of a packed :class:`Int8Linear` group's output (see the module docstring)."""

        def __init__(self, group, lo: int, hi: int) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = group.in_features, hi - lo
            self.group, self.lo, self.hi = group, lo, hi  # the group is a submodule of each member (shared)
            self.register_buffer("weight", torch.empty(0, dtype=torch.float32), persistent=False)
            self.bias = None

        def forward(self, x):  # type: ignore[override]
            packed = getattr(_last, "packed", None)
            if packed is not None and packed[0] is x and packed[1] is self.group:
                out = packed[2]
            else:
                out = self.group(x)
                _last.packed = (x, self.group, out)  # x held, so its id is not reused while cached
            return out[..., self.lo:self.hi]

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, columns {self.lo}:{self.hi} of a packed group"

    return Int8Slice


def quantize_int8(model, keep_bf16: bool = False) -> int:
    """Replace every ``nn.Linear`` (including the tied output head) with :class:`Int8Linear`; sibling
    layers that read one input (:data:`FUSED`) share one packed :class:`Int8Linear`; every layer but the
    output head keeps its int8 weights row-major for decode steps; ``keep_bf16`` keeps a bf16 copy of each
    weight for :func:`bf16_matmuls`. Returns how many linear layers were replaced."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    Int8Linear = _int8_linear_class()
    Int8Slice = _int8_slice_class()
    count = 0
    for parent in list(model.modules()):
        for names in FUSED:
            members = [getattr(parent, name, None) for name in names]
            if not all(type(m) is nn.Linear and m.in_features >= 64 for m in members):
                continue
            if len({m.in_features for m in members}) != 1 or len({m.bias is None for m in members}) != 1:
                continue
            bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
            packed = SimpleNamespace(in_features=members[0].in_features, out_features=sum(m.out_features for m in members),
                                     weight=torch.cat([m.weight.detach() for m in members]), bias=bias)
            group, lo = Int8Linear(packed, keep_bf16, decode_weights=True), 0
            for name, member in zip(names, members):
                setattr(parent, name, Int8Slice(group, lo, lo + member.out_features))
                lo += member.out_features
            count += len(members)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.in_features >= 64]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # the output head sees one position per forward (the engine keeps the last logits only): no bf16 copy
        setattr(parent, child, Int8Linear(module, keep_bf16 and module is not head, decode_weights=module is not head))
    return count + len(targets)
