"""Saved activations and working sets of the transformer stacks (DiT, condition-encoder and text-encoder layers), pure
functions of shapes: what autograd keeps per op (RMSNorm, attention, Linears with their adapters, SwiGLU) for one
layer, what one layer's backward and forward allocate besides that. Symbols as in estimate.py's docstring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from acestep_ft.preflight.trainset import LayerTrain


@dataclass
class Shape:
    """One stack's step: B sequences of N tokens (M = B*N rows) attending to L condition tokens (K = B*L rows),
    widths H, Q, V, I, E, and the autocast facts the saved bytes depend on."""

    B: int
    N: int
    L: int
    H: int
    Q: int
    V: int
    I: int  # noqa: E741
    E: int
    heads: int
    a: int  # bytes of the autocast dtype
    frozen_cast: bool  # frozen weights get an autocast copy (autocast on, frozen dtype is not the autocast dtype)
    eager: bool
    flex: bool  # self-attention through FlexAttention (cross-attention stays SDPA)
    window: int | None

    @property
    def M(self) -> int:
        return self.B * self.N

    @property
    def K(self) -> int:
        return self.B * self.L


F32 = 4


def norm_cost(rows: int, width: int, norm_dim: int, a: int, trains: bool, in_grad: bool) -> int:
    """RMSNorm over `norm_dim`: pow keeps the fp32 input and rsqrt keeps its output when the input needs a gradient;
    `weight * normed` keeps the normalized a-copy when the weight trains."""
    kept = F32 * rows * (width + width // norm_dim) if in_grad else 0
    return kept + (a * rows * width if trains else 0)


def _attention(s: Shape, rows: int, keys: int, q_len: int, k_len: int, bias_rows: int, flex: bool = False) -> int:
    """What the attention kernel keeps for q [rows, Q] and GQA-repeated k, v [keys, Q] (all in a).

    SDPA: q, k, v, the output (o_proj reads a view of it) and the fp32 log-sum-exp; a boolean mask becomes an
    a-bias [bias_rows, q_len, k_len] per call. Eager: q, k, v, the fp32 softmax output and its a-copy (read by the
    second matmul). Flex: q, the un-repeated k and v (GQA inside the kernel), the output and the fp32 log-sum-exp;
    its block mask is a few small tile tables."""
    if flex:
        return 2 * s.a * rows * s.Q + 2 * s.a * keys * s.V + F32 * s.B * s.heads * q_len
    qkv = s.a * rows * s.Q + 2 * s.a * keys * s.Q
    if not s.eager:
        return qkv + s.a * rows * s.Q + F32 * s.B * s.heads * q_len + s.a * bias_rows * q_len * k_len
    probs = s.B * s.heads * q_len * k_len
    return qkv + (F32 + (s.a if s.a != F32 else 0)) * probs


def _linears(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], names: Tuple[str, ...], rows: int,
             in_grad: bool, counted_elsewhere: bool, rank: int, dropout: bool, copies: bool = False) -> Tuple[int, int]:
    """(activation bytes, frozen-weight-cast bytes) that the Linears `names` reading one input keep.

    train: the input; Linears reading one input share it (the decoder keeps the residual stream row-major), counted
    once here unless `counted_elsewhere` (the condition, counted in the head; an attention output).
    lora: the adapter's dropout output + bool mask (a + 1) * rows * in (dropout > 0; else the input as for train)
    and its rank-r activation a * rows * r; the frozen base keeps its a-cast weight (autocast) if the input needs
    a gradient. dora: lora + the base and adapter outputs the magnitude's gradient reads, 2a * rows * out (with
    dropout, the base runs again on the dropped input with another a-cast weight). kron (LoKr / LoHa, which
    materialize the update and call F.linear with it): its own a-copy of the input + the a-cast update a * out * in.
    frozen: the cast weight only. copies: the input is not in the autocast dtype (an fp32 RMSNorm output, as in the
    condition encoder), so autocast casts it once per Linear and each keeps its own a-copy.
    """
    act = cast = 0
    shared = False
    for name in names:
        kind = lt.linears[name]
        fan_in, fan_out = lin[name]
        if kind != "train" and in_grad and s.frozen_cast:
            cast += s.a * fan_in * fan_out
        if kind == "frozen":
            continue
        if kind in ("lora", "dora"):
            act += s.a * rows * rank
        if kind == "dora":
            act += 2 * s.a * rows * fan_out + (s.a * fan_in * fan_out if dropout and s.frozen_cast else 0)
        if kind == "kron":  # its own a-cast input (PEFT casts the input to the update's fp32 first) + the update
            act += s.a * rows * fan_in + s.a * fan_in * fan_out
        elif kind in ("lora", "dora") and dropout:
            act += (s.a + 1) * rows * fan_in
        else:
            shared = True
            act += s.a * rows * fan_in if copies else 0
    return act + (s.a * rows * lin[names[0]][0] if shared and not counted_elsewhere and not copies else 0), cast


def reads_input(kind: str, dropout: bool) -> bool:
    """The Linear keeps its own input for backward (a trained weight, an adapter without dropout, LoKr / LoHa)."""
    return kind in ("train", "kron") or kind in ("lora", "dora") and not dropout


def _o_proj(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], name: str, rank: int,
            dropout: bool, in_grad: bool = True, o_copy: bool = False) -> Tuple[int, int]:
    """o_proj reads the attention output: a view of it for SDPA (already counted), a row-major copy for eager and
    where `o_copy` (transformers makes the output row-major again, or the adapter casts its own copy)."""
    act, cast = _linears(s, lt, lin, (name,), s.M, in_grad, True, rank, dropout)
    if (s.eager or o_copy) and reads_input(lt.linears[name], dropout):
        act += s.a * s.M * s.Q
    return act, cast


def _trains(lt: LayerTrain, *names: str) -> bool:
    return any(lt.linears[n] != "frozen" for n in names)


def _sum(*pairs: Tuple[int, int]) -> Tuple[int, int]:
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _self_attention(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], rank: int, dropout: bool,
                    h_grad: bool, bias_rows: int, copies: bool = False, o_copy: bool = False) -> Tuple[int, int]:
    """(saved, frozen-weight casts) of self-attention on h [M, H]: q, k, v -> q/k RMSNorm -> RoPE -> attention ->
    o_proj. h_grad: h needs a gradient; bias_rows: rows of the a-bias SDPA makes of a boolean mask (0: no mask);
    copies: see `_linears`; o_copy: see `_o_proj`."""
    act = norm_cost(s.M, s.Q, s.Q // s.heads, s.a, lt.norms, h_grad or _trains(lt, QKV[0]))
    act += norm_cost(s.M, s.V, s.Q // s.heads, s.a, lt.norms, h_grad or _trains(lt, QKV[1]))
    needs = h_grad or _trains(lt, *QKV)
    act += _attention(s, s.M, s.M, s.N, s.N, bias_rows, s.flex) if needs else 0
    return _sum((act, 0), _linears(s, lt, lin, QKV, s.M, h_grad, False, rank, dropout, copies),
                _o_proj(s, lt, lin, "self_attn.o_proj", rank, dropout, needs, o_copy))


def _mlp(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], rank: int, dropout: bool,
         h_grad: bool, copies: bool = False) -> Tuple[int, int]:
    """(saved, frozen-weight casts) of the SwiGLU on h [M, H]: down(silu(gate(h)) * up(h))."""
    needs = h_grad or _trains(lt, "mlp.gate_proj", "mlp.up_proj")
    act = 3 * s.a * s.M * s.I if needs else 0  # silu input, silu output, up output
    pairs = [_linears(s, lt, lin, ("mlp.gate_proj", "mlp.up_proj"), s.M, h_grad, False, rank, dropout, copies)]
    if lt.linears["mlp.down_proj"] == "train":
        act += s.a * s.M * s.I  # the product, down_proj's input
    else:
        pairs.append(_linears(s, lt, lin, ("mlp.down_proj",), s.M, needs, True, rank, dropout))
        if lt.linears["mlp.down_proj"] != "frozen" and reads_input(lt.linears["mlp.down_proj"], dropout):
            act += s.a * s.M * s.I
    return _sum((act, 0), *pairs)


def layer_cost(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], rank: int, dropout: bool,
               in_grad: bool, cond_grad: bool, temb_grad: bool, sliding: bool, bias_rows: int) -> Tuple[int, int]:
    """(saved activation bytes, frozen-weight-cast bytes) of one DiT layer that is not checkpointed. cond_grad: the
    condition needs a gradient (condition_embedder or the condition encoder trains)."""
    M, K, H, a = s.M, s.K, s.H, s.a
    mod = lt.table or temb_grad  # adaLN shift/scale/gate need a gradient
    # self-attention: h = norm(x) * (1 + scale) + shift -> attention -> * gate
    act = norm_cost(M, H, H, a, lt.norms, in_grad) + (F32 * M * H if mod else 0)
    h_grad = in_grad or mod or lt.norms
    self_attn = _self_attention(s, lt, lin, rank, dropout, h_grad, bias_rows if sliding and s.window is not None else 0)
    act += a * M * H if mod else 0  # o_proj output kept by "* gate"
    x_grad = h_grad or _trains(lt, *QKV, "self_attn.o_proj")
    # cross-attention: q from norm(x), k and v from the condition (one tensor shared by all layers)
    act += norm_cost(M, H, H, a, lt.norms, x_grad)
    h2_grad = x_grad or lt.norms
    cross = [_linears(s, lt, lin, ("cross_attn.q_proj",), M, h2_grad, False, rank, dropout),
             _linears(s, lt, lin, ("cross_attn.k_proj", "cross_attn.v_proj"), K, cond_grad, True, rank, dropout)]
    act += norm_cost(M, s.Q, s.Q // s.heads, a, lt.norms, h2_grad or _trains(lt, "cross_attn.q_proj"))
    act += norm_cost(K, s.V, s.Q // s.heads, a, lt.norms, cond_grad or _trains(lt, "cross_attn.k_proj"))
    needs = h2_grad or cond_grad or _trains(lt, "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj")
    act += _attention(s, M, K, s.N, s.L, bias_rows if bias_rows > 1 else 0) if needs else 0
    cross.append(_o_proj(s, lt, lin, "cross_attn.o_proj", rank, dropout, needs))
    x_grad = needs or _trains(lt, "cross_attn.o_proj")
    # MLP: h = norm(x) * (1 + c_scale) + c_shift -> SwiGLU -> * c_gate
    act += norm_cost(M, H, H, a, lt.norms, x_grad) + (F32 * M * H if mod else 0)
    mlp = _mlp(s, lt, lin, rank, dropout, x_grad or mod or lt.norms)
    act += a * M * H if mod else 0  # down_proj output kept by "* c_gate"
    return _sum((act, 0), self_attn, *cross, mlp)


def _prenorm_layer(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], in_grad: bool, bias_rows: int,
                   rank: int, dropout: bool, copies: bool, o_copy: bool) -> Tuple[int, int]:
    """(saved, frozen-weight casts) of a pre-norm layer: x += attn(norm(x)); x += mlp(norm(x)), rows M = s.B * s.N."""
    act = norm_cost(s.M, s.H, s.H, s.a, lt.norms, in_grad)
    h_grad = in_grad or lt.norms
    attn = _self_attention(s, lt, lin, rank, dropout, h_grad, bias_rows, copies, o_copy)
    x_grad = h_grad or _trains(lt, *QKV, "self_attn.o_proj")
    act += norm_cost(s.M, s.H, s.H, s.a, lt.norms, x_grad)
    return _sum((act, 0), attn, _mlp(s, lt, lin, rank, dropout, x_grad or lt.norms, copies))


def encoder_layer_cost(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], in_grad: bool,
                       bias_rows: int) -> Tuple[int, int]:
    """(saved activation bytes, frozen-weight-cast bytes) of one condition-encoder layer (pre-norm: x += attn(norm(x));
    x += mlp(norm(x))), rows M = s.B * s.N. Unlike the DiT's, its RMSNorm outputs stay in the weight's dtype (fp32
    when trained or frozen in fp32), so under autocast each Linear keeps its own a-copy of its input."""
    copies = s.a != F32 and (lt.norms or s.frozen_cast)
    return _prenorm_layer(s, lt, lin, in_grad, bias_rows, 0, False, copies, False)


def text_layer_cost(s: Shape, lt: LayerTrain, lin: Dict[str, Tuple[int, int]], in_grad: bool, rank: int,
                    dropout: bool) -> Tuple[int, int]:
    """(saved activation bytes, frozen-weight-cast bytes) of one layer of the transformers Qwen3 text encoder with a
    PEFT LoRA (mode.text_encoder=lora), pre-norm as the condition encoder's, rows M = s.B * s.N caption tokens.
    PEFT casts each adapter's input to the LoRA's fp32 before autocast casts it back, so under autocast every
    adapted Linear keeps its own a-copy of its input; transformers makes the attention output row-major again
    (.transpose().contiguous()), so a LoRA on o_proj keeps a copy of it besides the one the kernel keeps."""
    return _prenorm_layer(s, lt, lin, in_grad, 0, rank, dropout, s.a != F32, True)


def layer_temporaries(s: Shape) -> int:
    """The backward of one layer: its stream gradients (2a + 4) * M*H and SwiGLU gradients 3a * M*I."""
    return (2 * s.a + F32) * s.M * s.H + 3 * s.a * s.M * s.I


def layer_workspace(s: Shape, bias_rows: int) -> int:
    """What one layer allocates in its forward besides what it saves: the stream and its normed copy, then the
    largest of RMSNorm's fp32 temporaries, attention's q, k, v (GQA-repeated), output and mask bias, and the
    SwiGLU's three a*M*I; plus one a-cast frozen weight at a time."""
    attn = s.a * s.M * (3 * s.Q + 2 * s.V) + s.a * bias_rows * s.N * s.N
    cast = s.a * s.H * s.I if s.frozen_cast else 0
    return 2 * s.a * s.M * s.H + max(3 * F32 * s.M * s.H, attn, 3 * s.a * s.M * s.I) + cast


def band_mask_bytes(s: Shape, key_rows: int) -> Tuple[int, int]:
    """(peak while it is built, kept through the stack's layers) of a stack's dense sliding-window mask (sdpa / eager;
    layers.self_attention_masks), bytes; (0, 0) without sliding layers or with flex (a few small tile tables).
    band_mask computes |i - j| as two int64 [N, N] alive together (the difference and its abs), 16 * N^2, then a
    bool [N, N]; combine_masks with key padding (key_rows = B rows of key_valid; 0: none) ANDs it into a bool
    [B, 1, N, N] and ORs that with its empty-row fix, another one, while the band is still alive."""
    if s.window is None or s.flex:
        return 0, 0
    n2 = s.N * s.N
    if not key_rows:
        return 16 * n2, n2
    return max(16 * n2, n2 + 2 * key_rows * n2), key_rows * n2
