// The ops' decode fast path as a C++ kernel of the dispatcher (fxquant/kernels/native_entry.py), for the
// linear ops below and their mixture-of-experts twins (fxquant/ops/_experts.py).
//
// A Python op kernel costs ~20-30 us per call before its C kernel runs (argument binding, the checks,
// the routing, ctypes); a decoding LLM calls ~7 linear ops per layer per token.  For the ops registered
// at the bottom of this file (native_entry.py's OPS), two boxed kernels:
//
//  - at the AutogradCPU key (shadowing the Python Autograd kernel on CPU tensors; the Python one stays
//    for every other backend): a call where x or bias needs a gradient goes to the op's twin
//    fxquant::_grad_<op> (defined in Python, fxquant/ops/_linear.py: the autograd Function, as
//    before); every other call goes below autograd;
//  - at the BackendSelect key (in every call's key set, below autograd and the Python key, just above
//    the backends; torch.inference_mode calls, which skip the autograd keys, reach it too): plain dense
//    CPU tensors (no Python key: no fake / functional tensors, no dispatch mode) and a call the fast
//    path takes (the conditions in each op's function below) run the C kernel the Python CPU impl
//    would call for it, with the same arguments, so the result is the same bit for bit; anything
//    else (another dtype, nf4 blocks straddling rows, more rows, a wrong shape, which raises the
//    Python check's error) goes on to the backend's kernel: the Python CPU impl.
//
// The C kernels are the ones the Python wrappers call (fxquant/kernels/native_build.py loads them);
// Python passes their addresses and the row limits it routes by (fxquant_native::configure), so the
// thresholds have one source.  Nothing here allocates outside ATen, and a kernel that fails leaves the
// call to the Python path, which runs it again and raises its error.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <string>

namespace {

using Stack = torch::jit::Stack;

// the C kernels' signatures (native_avx512_bf16.c, native_avx512.c / native_cpu.c)
using Int4Gemv = int (*)(const void *, int, int64_t, int64_t, const uint8_t *, int64_t, int64_t, const uint16_t *,
                         const uint16_t *, int64_t, int64_t, float, void *, int, int64_t, int);
using Int8Gemv = int (*)(const float *, int64_t, int64_t, const int8_t *, const uint16_t *, int64_t, float *, int64_t,
                         int, int);
using Lut4Gemv = int (*)(const void *, int, int64_t, int64_t, const uint8_t *, int64_t, int64_t, const float *,
                         int64_t, int, const void *, const float *, const float *, float, int64_t, float *, int64_t,
                         int);

using AffineGemv = int (*)(const float *, int64_t, int64_t, const uint32_t *, int64_t, int, int64_t, int64_t,
                           const float *, const uint8_t *, float, float *, int64_t, int, int);

struct Config {
    std::atomic<bool> enabled{false};
    Int4Gemv int4 = nullptr;  // fxq512_int4t_bf16_gemv_x: int4wo, bf16 x, tiles of 64 rows
    int64_t int4_rows = 0;
    Int8Gemv int8 = nullptr;  // fxq(512)_int8_gemv: int8wo, fp32 x (and int8dq's int8 codes as fp32)
    int64_t int8_rows = 0;
    int64_t int8dq_rows = 0;  // int8dq's rows for that GEMV (0: not configured)
    Lut4Gemv lut4 = nullptr;  // fxq512_lut4_bf16_gemv_x: bnb4, bf16 x
    int64_t lut4_rows = 0;
    AffineGemv affine = nullptr;  // fxq_affine_gemv: linear_affine (GPTQ / AWQ / compressed-tensors), fp32 x
    int64_t affine_rows = 0;
};
Config cfg;

bool cpu(const at::Tensor &t) { return t.device().is_cpu() && !t.is_sparse(); }

// a 1-D contiguous CPU tensor of `dtype` with `numel` elements
bool flat(const at::Tensor &t, at::ScalarType dtype, int64_t numel) {
    return t.scalar_type() == dtype && cpu(t) && t.is_contiguous() && t.dim() == 1 && t.numel() == numel;
}

// x: a contiguous bf16 CPU tensor [..., k], k > 0, at least one row; its rows, or 0 when not.
int64_t bf16_rows(const at::Tensor &x, int64_t k) {
    if (x.scalar_type() != at::kBFloat16 || x.dim() < 1 || !cpu(x) || !x.is_contiguous() || k <= 0 ||
        x.size(-1) != k)
        return 0;
    return x.numel() / k;
}

bool bias_ok(const c10::IValue &b, int64_t n) {
    if (b.isNone()) return true;
    if (!b.isTensor()) return false;
    const at::Tensor &t = b.toTensor();
    return cpu(t) && t.dim() == 1 && t.size(0) == n && at::isFloatingType(t.scalar_type());
}

at::Tensor with_bias(at::Tensor y, const c10::IValue &b) {
    if (!b.isNone()) y.add_(b.toTensor().to(y.scalar_type()));  // the Python path: y + bias.to(x.dtype)
    return y;
}

at::Tensor out(const at::Tensor &x, int64_t n, at::ScalarType dtype) {
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    return at::empty(sizes, x.options().dtype(dtype));
}

// linear_int4wo(x, qweight, scales_and_zeros, bias, group_size, block_n, out_features, in_features,
// compute_dtype): ops/int4wo.py's _cpu_fast, native GEMV branch, for bf16 x with the bf16 dot kernel
at::Tensor int4wo(const c10::IValue *a) {
    if (!cfg.int4 || !a[8].isNone()) return {};
    const at::Tensor &x = a[0].toTensor(), &w = a[1].toTensor(), &sz = a[2].toTensor();
    int64_t g = a[4].toInt(), bn = a[5].toInt(), n = a[6].toInt(), k = a[7].toInt();
    int64_t m = bf16_rows(x, k);
    if (m < 1 || m > cfg.int4_rows || bn != 64 || n <= 0 || !(g == 32 || g == 64 || g == 128 || g == 256))
        return {};
    int64_t np = (n + 63) / 64 * 64, kp = (k + g - 1) / g * g;  // stored: whole groups, rows of 64-row tiles
    if (w.scalar_type() != at::kByte || !cpu(w) || !w.is_contiguous() || w.dim() != 2 || w.size(0) != np ||
        w.size(1) != kp / 2)
        return {};
    if (sz.scalar_type() != at::kBFloat16 || !cpu(sz) || !sz.is_contiguous() || sz.dim() != 3 ||
        sz.size(0) != kp / g || sz.size(1) != np || sz.size(2) != 2 || !bias_ok(a[3], n))
        return {};
    // a partial last group: x zero-padded to the stored width, as the Python path does (F.pad)
    at::Tensor xs = kp == k ? x : at::constant_pad_nd(x.reshape({m, k}), {0, kp - k});
    at::Tensor y = out(x, n, at::kBFloat16);
    auto s = reinterpret_cast<const uint16_t *>(sz.data_ptr());
    if (cfg.int4(xs.data_ptr(), 1, m, kp, w.data_ptr<uint8_t>(), n, g, s, s + 1, 2, 2 * np, 8.0f, y.data_ptr(), 1, n,
                 at::get_num_threads()))
        return {};
    return with_bias(y, a[3]);
}

// The int8 ops' common part (linear_int8wo / linear_int8dq(x, qweight, scale, bias, compute_dtype)): bf16 x at
// up to `limit` rows, an int8 [n, k] weight, a bf16 [n] scale; x's rows (n, k set), or 0.
int64_t int8_rows(const c10::IValue *a, int64_t limit, int64_t &n, int64_t &k) {
    if (!cfg.int8 || !a[4].isNone()) return 0;
    const at::Tensor &x = a[0].toTensor(), &w = a[1].toTensor(), &s = a[2].toTensor();
    if (w.scalar_type() != at::kChar || !cpu(w) || !w.is_contiguous() || w.dim() != 2) return 0;
    n = w.size(0), k = w.size(1);
    int64_t m = bf16_rows(x, k);
    return m < 1 || m > limit || n <= 0 || !flat(s, at::kBFloat16, n) || !bias_ok(a[3], n) ? 0 : m;
}

// The int8 GEMV on fp32 rows xf [m, k] (exact products, fp32 sums, times the weight scale): y fp32 [..., n]
// shaped as x, or undefined when the kernel failed.
at::Tensor int8_gemv(const c10::IValue *a, const at::Tensor &xf, int64_t m, int64_t n, int64_t k) {
    const at::Tensor &x = a[0].toTensor(), &w = a[1].toTensor(), &s = a[2].toTensor();
    at::Tensor y = out(x, n, at::kFloat);
    if (cfg.int8(xf.data_ptr<float>(), m, k, w.data_ptr<int8_t>(), reinterpret_cast<const uint16_t *>(s.data_ptr()),
                 n, y.data_ptr<float>(), n, 0, at::get_num_threads()))
        return {};
    return y;
}

// linear_int8wo: ops/int8wo.py's native GEMV branch, bf16 x (fp32 copy of x, fp32 result rounded to bf16
// once, as the Python path)
at::Tensor int8wo(const c10::IValue *a) {
    int64_t n, k, m = int8_rows(a, cfg.int8_rows, n, k);
    if (!m) return {};
    at::Tensor y = int8_gemv(a, a[0].toTensor().to(at::kFloat).contiguous(), m, n, k);
    return y.defined() ? with_bias(y.to(at::kBFloat16), a[3]) : y;
}

// linear_int8dq: ops/int8dq.py's _cpu_int8dq at the GEMV's rows, bf16 x: x quantized per row as
// formats/int8dq.quantize_activations does, in plain IEEE fp32 (no fast-math, so the same values as its ATen
// ops: fp32 absmax / 127 clamped to FLT_MIN, codes x / scale rounded half to even, clamped to +-127), the
// codes' product through the int8 GEMV, times the row scale, rounded to bf16 once
at::Tensor int8dq(const c10::IValue *a) {
    int64_t n, k, m = cfg.int8dq_rows > 0 ? int8_rows(a, cfg.int8dq_rows, n, k) : 0;
    if (!m) return {};
    const at::Tensor &x = a[0].toTensor();
    at::Tensor qf = at::empty({m, k}, x.options().dtype(at::kFloat)), sx = at::empty({m, 1}, qf.options());
    const uint16_t *xb = reinterpret_cast<const uint16_t *>(x.data_ptr());
    float *q = qf.data_ptr<float>(), *sc = sx.data_ptr<float>();
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *xr = xb + r * k;
        float *qr = q + r * k, amax = 0.f;
        for (int64_t i = 0; i < k; i++) {
            uint32_t bits = (uint32_t)xr[i] << 16;
            float v;
            std::memcpy(&v, &bits, 4);
            qr[i] = v;
            amax = std::max(amax, std::fabs(v));
        }
        const float scale = std::max(amax / 127.f, std::numeric_limits<float>::min());
        sc[r] = scale;
        for (int64_t i = 0; i < k; i++) qr[i] = std::min(127.f, std::max(-127.f, std::nearbyint(qr[i] / scale)));
    }
    at::Tensor y = int8_gemv(a, qf, m, n, k);
    if (!y.defined()) return y;
    y.view({m, n}).mul_(sx);
    return with_bias(y.to(at::kBFloat16), a[3]);
}

// linear_affine(x, qweight, scale, zero_point, bias, bits, group_size, symmetric, in_features, compute_dtype):
// ops/affine.py's native_linear for bf16 x at the GEMV's rows (x as fp32, the scale converted to fp32 exactly;
// fp32 result rounded to bf16 once)
at::Tensor affine(const c10::IValue *a) {
    if (!cfg.affine || !a[9].isNone()) return {};
    const at::Tensor &x = a[0].toTensor(), &q = a[1].toTensor(), &sc = a[2].toTensor(), &zp = a[3].toTensor();
    const int64_t bits = a[5].toInt(), g = a[6].toInt(), k = a[8].toInt();
    const bool sym = a[7].toBool();
    if (bits < 1 || bits > 8 || g < 1 || k <= 0) return {};
    const int64_t m = bf16_rows(x, k);
    if (m < 1 || m > cfg.affine_rows || q.scalar_type() != at::kInt || !cpu(q) || q.dim() != 2 || !q.is_contiguous())
        return {};
    const int64_t n = q.size(0), words = (k * bits + 31) / 32, groups = (k + g - 1) / g;
    const auto st = sc.scalar_type();
    if (n <= 0 || q.size(1) != words || !cpu(sc) || sc.dim() != 2 || sc.size(0) != n || sc.size(1) != groups ||
        !(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat) || !bias_ok(a[4], n))
        return {};
    if (sym ? !(zp.dim() == 1 && zp.numel() == 0 && zp.scalar_type() == at::kByte)
            : !(zp.scalar_type() == at::kByte && cpu(zp) && zp.dim() == 2 && zp.size(0) == n && zp.size(1) == groups))
        return {};
    at::Tensor s32 = sc.to(at::kFloat).contiguous(), z = sym ? zp : zp.contiguous();
    at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = out(x, n, at::kFloat);
    if (cfg.affine(xf.data_ptr<float>(), m, k, reinterpret_cast<const uint32_t *>(q.data_ptr()), words, (int)bits, n, g,
                   s32.data_ptr<float>(), sym ? nullptr : z.data_ptr<uint8_t>(), (float)(1 << (bits - 1)),
                   y.data_ptr<float>(), n, 0, at::get_num_threads()))
        return {};
    return with_bias(y.to(at::kBFloat16), a[4]);
}

// The bnb4 ops' common part: bf16 x [..., k] at the GEMV's rows, a blocksize of formats/bnb4.py's
// BLOCKSIZES dividing k (blocks not straddling rows), the codes and the fp32 table; x's rows or 0.
int64_t lut4_rows(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &table, int64_t bs, int64_t n,
                  int64_t k) {
    int64_t m = bf16_rows(x, k);
    if (m < 1 || m > cfg.lut4_rows || n <= 0 || bs < 32 || bs > 4096 || (bs & (bs - 1)) || k % bs ||
        !flat(codes, at::kByte, n * k / 2) || !flat(table, at::kFloat, 16))
        return 0;
    return m;
}

// ops/bnb4.py's _native for those calls (the bf16 dot kernel; the fp32 result rounded to bf16 once).
// mode 0: `sc` the fp32 absmax per block; 2: uint8 indices into `dq_code` (double quant)
at::Tensor lut4(const at::Tensor &x, int64_t m, const at::Tensor &codes, const at::Tensor &table, int64_t bs,
                int64_t n, int64_t k, int mode, const at::Tensor &sc, const float *dq_code, const float *dq_scale,
                float dq_offset, int64_t dq_block, const c10::IValue &bias) {
    at::Tensor y = out(x, n, at::kFloat);
    if (cfg.lut4(x.data_ptr(), 1, m, k / 2, codes.data_ptr<uint8_t>(), k / 2, n, table.data_ptr<float>(), bs / 2,
                 mode, sc.data_ptr(), dq_code, dq_scale, dq_offset, dq_block, y.data_ptr<float>(), n,
                 at::get_num_threads()))
        return {};
    return with_bias(y.to(at::kBFloat16), bias);
}

// linear_bnb4(x, codes, absmax, code_table, bias, blocksize, out_features, in_features, compute_dtype):
// bf16 x below the native GEMM's rows, blocks not straddling rows, fp32 absmax
at::Tensor bnb4(const c10::IValue *a) {
    if (!cfg.lut4 || !a[8].isNone()) return {};
    const at::Tensor &x = a[0].toTensor(), &c = a[1].toTensor(), &am = a[2].toTensor(), &t = a[3].toTensor();
    int64_t bs = a[5].toInt(), n = a[6].toInt(), k = a[7].toInt();
    int64_t m = lut4_rows(x, c, t, bs, n, k);
    if (m < 1 || !flat(am, at::kFloat, n * k / bs) || !bias_ok(a[4], n)) return {};
    return lut4(x, m, c, t, bs, n, k, 0, am, nullptr, nullptr, 0.0f, 1, a[4]);
}

// linear_bnb4_dq(x, codes, absmax_q, absmax_code, absmax_scale, absmax_offset, code_table, bias, blocksize,
// absmax_blocksize, out_features, in_features, compute_dtype): the same with the absmax double-quantized
// (bitsandbytes' double quant: the kernel decodes absmax_code[q] * absmax_scale[b / absmax_blocksize] + offset)
at::Tensor bnb4_dq(const c10::IValue *a) {
    if (!cfg.lut4 || !a[12].isNone()) return {};
    const at::Tensor &x = a[0].toTensor(), &c = a[1].toTensor(), &q = a[2].toTensor(), &dc = a[3].toTensor(),
                     &ds = a[4].toTensor(), &off = a[5].toTensor(), &t = a[6].toTensor();
    int64_t bs = a[8].toInt(), dbs = a[9].toInt(), n = a[10].toInt(), k = a[11].toInt();
    int64_t m = lut4_rows(x, c, t, bs, n, k), blocks = n * k / bs;
    if (m < 1 || dbs < 1 || !flat(q, at::kByte, blocks) || !flat(dc, at::kFloat, 256) ||
        !flat(ds, at::kFloat, (blocks + dbs - 1) / dbs) || off.scalar_type() != at::kFloat || !cpu(off) ||
        off.numel() != 1 || off.dim() > 1 || !bias_ok(a[7], n))
        return {};
    return lut4(x, m, c, t, bs, n, k, 2, q, dc.data_ptr<float>(), ds.data_ptr<float>(), *off.data_ptr<float>(), dbs,
                a[7]);
}

using Fast = at::Tensor (*)(const c10::IValue *);

// linear_<op>_experts(x, offs, <T tensors stacked over experts>, <S scalars>, compute_dtype, input_scale):
// ops/_experts.py's impl, each expert's rows through the per-expert op's fast path above (the same
// arguments the Python loop passes: x's rows, the expert's tensors, no bias, the scalars), rows past the
// last end zero.  Any expert the fast path does not take (more rows than the GEMV's, another dtype), an
// AWQ input_scale or an offs the Python check refuses: the whole call goes on to the Python impl.
template <Fast fast, int T, int S>
at::Tensor experts(const c10::IValue *a) {
    if (!a[2 + T + S + 1].isNone()) return {};
    const at::Tensor &x = a[0].toTensor(), &offs = a[1].toTensor();
    if (x.dim() != 2 || !cpu(x) || x.scalar_type() != at::kBFloat16 || !x.is_contiguous() || !cpu(offs) ||
        offs.dim() != 1 || !(offs.scalar_type() == at::kInt || offs.scalar_type() == at::kLong))
        return {};
    const int64_t e = offs.size(0), rows = x.size(0);
    for (int t = 0; t < T; t++) {
        const at::Tensor &w = a[2 + t].toTensor();
        if (w.dim() < 1 || w.size(0) != e || !cpu(w)) return {};
    }
    const at::Tensor ends = offs.to(at::kLong).contiguous();
    const int64_t *end = ends.data_ptr<int64_t>();
    c10::IValue args[T + S + 3];  // the per-expert op's: x, tensors, bias (None), scalars, compute_dtype
    for (int s = 0; s < S; s++) args[2 + T + s] = a[2 + T + s];
    args[2 + T + S] = a[2 + T + S];
    at::Tensor y;
    int64_t start = 0;
    for (int64_t i = 0; i < e; i++) {
        if (end[i] < start || end[i] > rows) return {};
        if (end[i] == start) continue;
        args[0] = x.narrow(0, start, end[i] - start);
        for (int t = 0; t < T; t++) args[1 + t] = a[2 + t].toTensor().select(0, i);
        at::Tensor ye = fast(args);
        if (!ye.defined() || ye.dim() != 2) return {};
        if (!y.defined()) y = at::empty({rows, ye.size(1)}, ye.options());
        y.narrow(0, start, end[i] - start).copy_(ye);
        start = end[i];
    }
    if (!y.defined()) return {};
    if (start < rows) y.narrow(0, start, rows - start).zero_();
    return y;
}

// Whether the fast path computed the call (its result replacing the nargs arguments on the stack):
// only when enabled and the next kernel below would be the CPU backend's (plain dense CPU tensors).
bool took(Fast fast, c10::DispatchKeySet below, size_t nargs, Stack *stack) {
    if (!cfg.enabled.load(std::memory_order_relaxed) || below.highestPriorityTypeId() != c10::DispatchKey::CPU)
        return false;
    at::Tensor y = fast(stack->data() + (stack->size() - nargs));
    if (!y.defined()) return false;
    torch::jit::drop(*stack, nargs);
    stack->emplace_back(std::move(y));
    return true;
}

// At the AutogradCPU key: a call that needs a gradient goes to the op's Python autograd twin, every
// other one below autograd (to below_autograd), as the Python Autograd kernel does.
template <int kBias>
void entry(const c10::OperatorHandle &op, c10::DispatchKeySet ks, Stack *stack) {
    const size_t nargs = op.schema().arguments().size();
    const c10::IValue *a = stack->data() + (stack->size() - nargs);
    const at::Tensor &x = a[0].toTensor();
    if (c10::GradMode::is_enabled() &&
        (x.requires_grad() || (a[kBias].isTensor() && a[kBias].toTensor().requires_grad()))) {
        const auto &name = op.schema().name();  // "fxquant::linear_..."
        auto twin = c10::Dispatcher::singleton().findSchemaOrThrow(
            ("fxquant::_grad_" + name.substr(name.find("::") + 2)).c_str(), "");
        twin.callBoxed(stack);
        return;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// The fast path, at the BackendSelect key: always in a call's key set, below autograd and the Python
// key, just above the backends, so it sees the calls the autograd entry hands on and those that skip
// the autograd keys (torch.inference_mode) alike.
template <Fast fast>
void below_autograd(const c10::OperatorHandle &op, c10::DispatchKeySet ks, Stack *stack) {
    const c10::DispatchKeySet rest =
        ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);
    if (took(fast, rest, op.schema().arguments().size(), stack)) return;
    op.redispatchBoxed(rest, stack);
}

void configure(std::string kernel, int64_t address, int64_t rows) {
    if (kernel == "enabled") {
        cfg.enabled.store(address != 0);
    } else if (kernel == "int4") {
        cfg.int4 = reinterpret_cast<Int4Gemv>(address), cfg.int4_rows = rows;
    } else if (kernel == "int8") {
        cfg.int8 = reinterpret_cast<Int8Gemv>(address), cfg.int8_rows = rows;
    } else if (kernel == "int8dq") {
        cfg.int8dq_rows = rows;
    } else if (kernel == "affine") {
        cfg.affine = reinterpret_cast<AffineGemv>(address), cfg.affine_rows = rows;
    } else if (kernel == "lut4") {
        cfg.lut4 = reinterpret_cast<Lut4Gemv>(address), cfg.lut4_rows = rows;
    } else {
        TORCH_CHECK(false, "fxquant_native::configure: unknown kernel '", kernel,
                    "'; valid: enabled, int4, int8, int8dq, affine, lut4");
    }
}

bool enabled() { return cfg.enabled.load(); }

}  // namespace

TORCH_LIBRARY(fxquant_native, m) {
    m.def("configure(str kernel, int address, int rows) -> ()", &configure);
    m.def("enabled() -> bool", &enabled);
}

TORCH_LIBRARY_IMPL(fxquant, AutogradCPU, m) {
    m.impl("linear_int4wo", torch::CppFunction::makeFromBoxedFunction<&entry<3>>());  // the bias's index
    m.impl("linear_int8wo", torch::CppFunction::makeFromBoxedFunction<&entry<3>>());
    m.impl("linear_int8dq", torch::CppFunction::makeFromBoxedFunction<&entry<3>>());
    m.impl("linear_bnb4", torch::CppFunction::makeFromBoxedFunction<&entry<4>>());
    m.impl("linear_affine", torch::CppFunction::makeFromBoxedFunction<&entry<4>>());
    m.impl("linear_bnb4_dq", torch::CppFunction::makeFromBoxedFunction<&entry<7>>());
    // the experts twins have no bias: index 1 is offs (an integer tensor, never needing a gradient)
    m.impl("linear_int4wo_experts", torch::CppFunction::makeFromBoxedFunction<&entry<1>>());
    m.impl("linear_int8wo_experts", torch::CppFunction::makeFromBoxedFunction<&entry<1>>());
    m.impl("linear_int8dq_experts", torch::CppFunction::makeFromBoxedFunction<&entry<1>>());
    m.impl("linear_bnb4_experts", torch::CppFunction::makeFromBoxedFunction<&entry<1>>());
    m.impl("linear_affine_experts", torch::CppFunction::makeFromBoxedFunction<&entry<1>>());
    m.impl("linear_bnb4_dq_experts", torch::CppFunction::makeFromBoxedFunction<&entry<1>>());
}

TORCH_LIBRARY_IMPL(fxquant, BackendSelect, m) {
    m.impl("linear_int4wo", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&int4wo>>());
    m.impl("linear_int8wo", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&int8wo>>());
    m.impl("linear_int8dq", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&int8dq>>());
    m.impl("linear_bnb4", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&bnb4>>());
    m.impl("linear_affine", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&affine>>());
    m.impl("linear_bnb4_dq", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&bnb4_dq>>());
    m.impl("linear_int4wo_experts", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&experts<&int4wo, 2, 4>>>());
    m.impl("linear_int8wo_experts", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&experts<&int8wo, 2, 0>>>());
    m.impl("linear_int8dq_experts", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&experts<&int8dq, 2, 0>>>());
    m.impl("linear_bnb4_experts", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&experts<&bnb4, 3, 3>>>());
    m.impl("linear_affine_experts", torch::CppFunction::makeFromBoxedFunction<&below_autograd<&experts<&affine, 3, 4>>>());
    m.impl("linear_bnb4_dq_experts",
           torch::CppFunction::makeFromBoxedFunction<&below_autograd<&experts<&bnb4_dq, 6, 4>>>());
}
