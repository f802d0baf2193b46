#include "layers/gpt.h"

#include <cmath>
#include <stdexcept>

#include "core/matmul.h"
#include "core/quantize.h"

namespace intrain {

void GPTConfig::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("model configuration: " + what);
  };
  need(n_layer >= 1 && n_layer <= 64, "--layers must be in 1..64, got " + std::to_string(n_layer));
  need(n_embd >= 8 && n_embd <= 4096, "--d-model must be in 8..4096, got " + std::to_string(n_embd));
  need(n_head >= 1 && n_embd % n_head == 0,
       "--heads must divide --d-model (" + std::to_string(n_embd) + "), got " + std::to_string(n_head));
  need(n_ctx >= 2 && n_ctx <= 4096, "--context must be in 2..4096, got " + std::to_string(n_ctx));
  need(vocab_size == 256, "the vocabulary is byte-level (256)");
}

namespace {

// Deterministic N(0, 1) draws keyed by (seed, stream, index): Box-Muller on
// two counter-based uniforms, so initialisation does not depend on threads.
float normal(const RngKey& k, std::uint32_t i) {
  const double u1 = (static_cast<double>(k.bits(2 * i)) + 1.0) / 4294967297.0;
  const double u2 = static_cast<double>(k.bits(2 * i + 1)) / 4294967296.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// Every parameter of the model, in params_ order, with its initialisation.
struct ParamSpec {
  std::string name;
  Shape shape;
  ParamKind kind;
  float std;  // 0: constant `fill`
  float fill;
};

std::vector<ParamSpec> param_specs(const GPTConfig& cfg, float init_std) {
  const std::int64_t C = cfg.n_embd, V = cfg.vocab_size;
  std::vector<ParamSpec> specs;
  const float proj_std = init_std / std::sqrt(2.0f * static_cast<float>(cfg.n_layer));
  specs.push_back({"wte.weight", {V, C}, ParamKind::Embedding, init_std, 0.0f});
  specs.push_back({"wpe.weight", {cfg.n_ctx, C}, ParamKind::Embedding, init_std, 0.0f});
  for (int l = 0; l < cfg.n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    specs.push_back({p + "ln_1.weight", {C}, ParamKind::Norm, 0.0f, 1.0f});
    specs.push_back({p + "ln_1.bias", {C}, ParamKind::Norm, 0.0f, 0.0f});
    specs.push_back({p + "attn.c_attn.weight", {C, 3 * C}, ParamKind::MatmulWeight, init_std, 0.0f});
    specs.push_back({p + "attn.c_attn.bias", {3 * C}, ParamKind::Bias, 0.0f, 0.0f});
    specs.push_back({p + "attn.c_proj.weight", {C, C}, ParamKind::MatmulWeight, proj_std, 0.0f});
    specs.push_back({p + "attn.c_proj.bias", {C}, ParamKind::Bias, 0.0f, 0.0f});
    specs.push_back({p + "ln_2.weight", {C}, ParamKind::Norm, 0.0f, 1.0f});
    specs.push_back({p + "ln_2.bias", {C}, ParamKind::Norm, 0.0f, 0.0f});
    specs.push_back({p + "mlp.c_fc.weight", {C, 4 * C}, ParamKind::MatmulWeight, init_std, 0.0f});
    specs.push_back({p + "mlp.c_fc.bias", {4 * C}, ParamKind::Bias, 0.0f, 0.0f});
    specs.push_back({p + "mlp.c_proj.weight", {4 * C, C}, ParamKind::MatmulWeight, proj_std, 0.0f});
    specs.push_back({p + "mlp.c_proj.bias", {C}, ParamKind::Bias, 0.0f, 0.0f});
  }
  specs.push_back({"ln_f.weight", {C}, ParamKind::Norm, 0.0f, 1.0f});
  specs.push_back({"ln_f.bias", {C}, ParamKind::Norm, 0.0f, 0.0f});
  return specs;
}

}  // namespace

GPT::GPT(const GPTConfig& cfg, const Precision& prec, std::uint64_t seed, float init_std)
    : GPT(cfg, prec, Unfilled{}) {
  if (!(init_std > 0.0f && init_std <= 1.0f))
    throw std::invalid_argument("model configuration: --init-std must be in (0, 1], got " + std::to_string(init_std));
  const std::vector<ParamSpec> specs = param_specs(cfg_, init_std);
  for (std::size_t s = 0; s < specs.size(); ++s) {
    const ParamSpec& sp = specs[s];
    std::int64_t n = 1;
    for (auto d : sp.shape) n *= d;
    std::vector<float> init(static_cast<std::size_t>(n), sp.fill);
    if (sp.std > 0.0f) {
      const RngKey k(seed, mix64(0x1A17 + s));
      for (std::int64_t i = 0; i < n; ++i) init[static_cast<std::size_t>(i)] = sp.std * normal(k, static_cast<std::uint32_t>(i));
    }
    params_[s].master = prec_.is_float() ? quantize(init, sp.shape, Format::fp32())
                                         : quantize_at(init, sp.shape, Format::wide(31), kMasterExponent);
  }
  refresh_values(0, seed);
}

GPT::GPT(const GPTConfig& cfg, const Precision& prec, Unfilled) : cfg_(cfg), prec_(prec) {
  cfg_.validate();
  const std::vector<ParamSpec> specs = param_specs(cfg_, 0.02f);
  params_.reserve(specs.size());
  for (const ParamSpec& sp : specs) {
    Param p;
    p.name = sp.name;
    p.kind = sp.kind;
    p.shape = sp.shape;
    params_.push_back(std::move(p));
  }
  wte_ = &param("wte.weight");
  wpe_ = &param("wpe.weight");
  lnf_g_ = &param("ln_f.weight");
  lnf_b_ = &param("ln_f.bias");
  for (int l = 0; l < cfg_.n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    blocks_.push_back(Block{&param(p + "ln_1.weight"), &param(p + "ln_1.bias"), &param(p + "ln_2.weight"),
                            &param(p + "ln_2.bias"),
                            std::make_unique<Linear>(&param(p + "attn.c_attn.weight"), &param(p + "attn.c_attn.bias"), prec_.tiling),
                            std::make_unique<Linear>(&param(p + "attn.c_proj.weight"), &param(p + "attn.c_proj.bias"), prec_.tiling),
                            std::make_unique<Linear>(&param(p + "mlp.c_fc.weight"), &param(p + "mlp.c_fc.bias"), prec_.tiling),
                            std::make_unique<Linear>(&param(p + "mlp.c_proj.weight"), &param(p + "mlp.c_proj.bias"), prec_.tiling),
                            {}, {}, {}, {}, {}, {}, {}});
  }
}

Param& GPT::param(const std::string& name) {
  for (Param& p : params_)
    if (p.name == name) return p;
  throw std::out_of_range("GPT: no parameter named '" + name + "'");
}

bool GPT::has_param(const std::string& name) const {
  for (const Param& p : params_)
    if (p.name == name) return true;
  return false;
}

std::int64_t GPT::num_parameters() const {
  std::int64_t n = 0;
  for (const Param& p : params_) n += p.master.numel();
  return n;
}

std::vector<std::string> GPT::linear_modules() const {
  std::vector<std::string> names;
  for (int l = 0; l < cfg_.n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    for (const char* m : {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}) names.push_back(p + m);
  }
  return names;
}

std::pair<std::int64_t, std::int64_t> GPT::linear_dims(const std::string& module) const {
  const std::int64_t C = cfg_.n_embd;
  if (module.ends_with("attn.c_attn")) return {C, 3 * C};
  if (module.ends_with("attn.c_proj")) return {C, C};
  if (module.ends_with("mlp.c_fc")) return {C, 4 * C};
  if (module.ends_with("mlp.c_proj")) return {4 * C, C};
  throw std::out_of_range("GPT: no linear layer named '" + module + "'");
}

std::unique_ptr<LinearLayer>* GPT::linear_slot(std::size_t i) {
  Block& b = blocks_[i / 4];
  std::unique_ptr<LinearLayer>* slots[] = {&b.c_attn, &b.c_proj, &b.c_fc, &b.mlp_proj};
  return slots[i % 4];
}

std::unique_ptr<LinearLayer> GPT::replace_linear(const std::string& module, std::unique_ptr<LinearLayer> layer) {
  const std::vector<std::string> names = linear_modules();
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (names[i] != module) continue;
    std::swap(*linear_slot(i), layer);
    return layer;
  }
  throw std::out_of_range("GPT: no linear layer named '" + module + "'");
}

void GPT::freeze() {
  for (Param& p : params_) p.frozen = true;
}

void GPT::set_batch_shard(const Collective* comm) {
  if (comm && comm->size() > 1 && prec_.tiling.any()) {
    throw std::invalid_argument("--outlier-tiling runs single-process only: its thresholds are statistics of the whole "
                                "tensor (spread, percentile, top-k) that the ranks do not share; run without mpirun");
  }
  batch_shard_ = comm;
}

RngKey GPT::key(std::uint64_t op) const {
  RngKey k(seed_, stream_id(step_, op));
  if (sliced_pass_) k.batch_shard = batch_shard_;
  return k;
}

void GPT::note_split(const OutlierSplit& s) {
  attention_outliers_ += s.outliers();
  attention_split_elements_ += s.bulk.numel();
}

void GPT::note(const Tensor& t) {
  saturated_ += t.saturated();
  cast_elements_ += t.numel();
}

void GPT::refresh_values(std::uint64_t step, std::uint64_t seed) {
  const RngKey base(seed, stream_id(step, 0xF0F0));
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Param& p = params_[i];
    if (p.master.empty()) continue;  // a weight replaced for good (e.g. by packed codes)
    if (prec_.is_float()) {
      p.value = p.master;
      continue;
    }
    const bool operand = p.kind == ParamKind::MatmulWeight || p.kind == ParamKind::Embedding;
    p.value = cast(p.master, operand ? prec_.w : residual_format(), base.derive(i));
  }
}

namespace {

// Attention's operands split for outlier tiling (role A); defined after
// GPT::block_backward.
struct AttentionSplits {
  OutlierSplit q, k, v;
};
AttentionSplits split_attention(const Tensor& q, const Tensor& k, const Tensor& v, const OutlierPolicy& policy,
                                RngKey key);
OutlierSplit split_probabilities(const Tensor& P, const OutlierPolicy& policy, RngKey key);

}  // namespace

// ---------------------------------------------------------------------------
// One block, forward then backward. Shapes: h [B*T, C]; heads [B*H, T, D].
// Op ids for the rounding streams: 100 * (layer + 1) + a local number.
// ---------------------------------------------------------------------------

Tensor GPT::block_forward(Block& b, int layer, Tensor h) {
  const std::int64_t H = cfg_.n_head, D = cfg_.n_embd / H;
  const std::uint64_t id = 100 * static_cast<std::uint64_t>(layer + 1);
  const Format& A = prec_.a;
  const Format A_in = prec_.linear_a();  // inputs of the linear layers
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  // Attention: h += c_proj(attn(ln_1(h)))
  const Tensor a1 = layernorm_forward(h, b.ln1_g->value, b.ln1_b->value, A_in, key(id + 1), b.ln1);
  note(a1);
  // q, k, v: the run's A format, or 16 bits when attention is tiled (split below).
  const Tensor qkv = b.c_attn->forward(a1, A_in, key(id + 2));
  note(qkv);
  Tensor PV;  // P·V, [BH, T, D]
  if (prec_.tiling.a && !prec_.is_float()) {
    // Tiled attention (role A): q, k, v and P are written at 16 bits and
    // split. The 16-bit sources are saved; block_backward re-splits them
    // with the same keys, which gives the same splits bit for bit.
    split_heads(qkv, B_, T_, H, A_in, key(id + 3), b.q, b.k, b.v);
    const AttentionSplits s = split_attention(b.q, b.k, b.v, prec_.tiling.policy, key(id + 3));
    b.P = causal_softmax_forward(matmul_tiled(s.q, s.k, Trans::N, Trans::T), scale, A_in, key(id + 4));
    note(b.P);
    const OutlierSplit sP = split_probabilities(b.P, prec_.tiling.policy, key(id + 4));
    for (const OutlierSplit* sp : {&s.q, &s.k, &s.v, &sP}) note_split(*sp);
    PV = matmul_tiled(sP, s.v);
  } else {
    split_heads(qkv, B_, T_, H, A, key(id + 3), b.q, b.k, b.v);
    const Tensor S = matmul(b.q, b.k, Trans::N, Trans::T);  // [BH, T, T]
    b.P = causal_softmax_forward(S, scale, A, key(id + 4));
    note(b.P);
    PV = matmul(b.P, b.v);
  }
  const Tensor Y = merge_heads(PV, B_, T_, H, A_in, key(id + 5));  // [B*T, C]
  note(Y);
  const Tensor o = b.c_proj->forward(Y, residual(), key(id + 6));
  residual_add(h, o, key(id + 7));
  note(h);

  // MLP: h += c_proj(gelu(c_fc(ln_2(h))))
  const Tensor a2 = layernorm_forward(h, b.ln2_g->value, b.ln2_b->value, A_in, key(id + 8), b.ln2);
  note(a2);
  b.z = b.c_fc->forward(a2, residual(), key(id + 9));
  const Tensor g = gelu_forward(b.z, A_in, key(id + 10));
  note(g);
  const Tensor p = b.mlp_proj->forward(g, residual(), key(id + 11));
  residual_add(h, p, key(id + 12));
  note(h);
  return h;
}

Tensor GPT::block_backward(Block& b, int layer, Tensor dh) {
  const std::int64_t H = cfg_.n_head, D = cfg_.n_embd / H;
  const std::uint64_t id = 100 * static_cast<std::uint64_t>(layer + 1) + 50;
  const Format& E = prec_.e;
  const Format E_in = prec_.linear_e();  // errors entering the linear layers
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  // MLP: dh flows into both the residual and the MLP branch.
  const Tensor dp = cast(dh, E_in, key(id + 1));
  note(dp);
  const Tensor dg = b.mlp_proj->backward(dp, key(id + 11));
  const Tensor dz = gelu_backward(dg, b.z, E_in, key(id + 2));
  note(dz);
  const Tensor da2 = b.c_fc->backward(dz, key(id + 12));
  Tensor dg2, db2;
  const Tensor dln2 = layernorm_backward(da2, b.ln2_g->value, b.ln2, dg2, db2, key(id + 3));
  b.ln2_g->accumulate(std::move(dg2));
  b.ln2_b->accumulate(std::move(db2));
  residual_add(dh, dln2, key(id + 4));
  b.z = Tensor();

  // Attention.
  const Tensor dout = cast(dh, E_in, key(id + 5));
  note(dout);
  Tensor dQ, dK, dV;
  const bool ta = prec_.tiling.a && !prec_.is_float(), te = prec_.tiling.e && !prec_.is_float();
  if (ta || te) {
    // Tiled attention: the operands of the tiled roles are split (A: q, k,
    // v and P, re-split from the saved 16-bit sources with the forward's
    // keys; E: dY and dS, written at 16 bits). Softmax's backward sees P as
    // the split holds it: the value the forward's P·V used.
    const std::uint64_t fid = id - 50;  // block_forward's op ids
    const OutlierPolicy& policy = prec_.tiling.policy;
    const Format E_att = te ? E_in : E;
    const Tensor dY = split_heads_one(b.c_proj->backward(dout, key(id + 13)), B_, T_, H, E_att, key(id + 6));
    note(dY);
    const AttentionSplits s = ta ? split_attention(b.q, b.k, b.v, policy, key(fid + 3)) : AttentionSplits{};
    const OutlierSplit sP = ta ? split_probabilities(b.P, policy, key(fid + 4)) : OutlierSplit{};
    const OutlierSplit sdY = te ? outlier_split(dY, policy, key(id + 6).derive(0xE1)) : OutlierSplit{};
    // (s and sP were counted in the forward pass; they are recomputed here, not stored.)
    if (te) note_split(sdY);
    auto op = [](bool tiled, const OutlierSplit& sp, const Tensor& t) { return tiled ? TiledOperand(sp) : TiledOperand(t); };
    const TiledOperand q = op(ta, s.q, b.q), k = op(ta, s.k, b.k), v = op(ta, s.v, b.v), P = op(ta, sP, b.P);
    const TiledOperand dy = op(te, sdY, dY);
    const Tensor dP = matmul_tiled(dy, v, Trans::N, Trans::T);  // [BH, T, T]
    dV = matmul_tiled(P, dy, Trans::T, Trans::N);               // [BH, T, D]
    const Tensor dS = causal_softmax_backward(dP, ta ? sP.merged() : b.P, scale, E_att, key(id + 7));
    note(dS);
    const OutlierSplit sdS = te ? outlier_split(dS, policy, key(id + 7).derive(0xE2)) : OutlierSplit{};
    if (te) note_split(sdS);
    const TiledOperand ds = op(te, sdS, dS);
    dQ = matmul_tiled(ds, k);                       // [BH, T, D]
    dK = matmul_tiled(ds, q, Trans::T, Trans::N);  // [BH, T, D]
  } else {
    const Tensor dY = split_heads_one(b.c_proj->backward(dout, key(id + 13)), B_, T_, H, E, key(id + 6));  // [BH, T, D]
    note(dY);
    const Tensor dP = matmul(dY, b.v, Trans::N, Trans::T);  // [BH, T, T]
    dV = matmul(b.P, dY, Trans::T, Trans::N);               // [BH, T, D]
    const Tensor dS = causal_softmax_backward(dP, b.P, scale, E, key(id + 7));
    note(dS);
    dQ = matmul(dS, b.k);                       // [BH, T, D]
    dK = matmul(dS, b.q, Trans::T, Trans::N);  // [BH, T, D]
  }
  const Tensor dqkv = merge_qkv(dQ, dK, dV, B_, T_, H, E_in, key(id + 8));
  note(dqkv);
  const Tensor da1 = b.c_attn->backward(dqkv, key(id + 14));
  Tensor dg1, db1;
  const Tensor dln1 = layernorm_backward(da1, b.ln1_g->value, b.ln1, dg1, db1, key(id + 9));
  b.ln1_g->accumulate(std::move(dg1));
  b.ln1_b->accumulate(std::move(db1));
  residual_add(dh, dln1, key(id + 10));
  b.q = b.k = b.v = b.P = Tensor();
  return dh;
}

namespace {

// The splits of q, k, v (saved in the block at 16 bits) and of P, each on its
// own stream of `key` (the key of the op that wrote them), so forward and
// backward make the same splits.
AttentionSplits split_attention(const Tensor& q, const Tensor& k, const Tensor& v, const OutlierPolicy& policy,
                                RngKey key) {
  return {outlier_split(q, policy, key.derive(0xA1)), outlier_split(k, policy, key.derive(0xA2)),
          outlier_split(v, policy, key.derive(0xA3))};
}
OutlierSplit split_probabilities(const Tensor& P, const OutlierPolicy& policy, RngKey key) {
  return outlier_split(P, policy, key.derive(0xA4));
}

}  // namespace

double GPT::forward(const std::int32_t* tokens, const std::int32_t* targets, std::int64_t B, std::int64_t T,
                    std::uint64_t step, std::uint64_t seed, bool train) {
  if (T < 1 || T > cfg_.n_ctx) {
    throw std::invalid_argument("GPT::forward: sequence length " + std::to_string(T) + " is outside 1.." +
                                std::to_string(cfg_.n_ctx));
  }
  step_ = step;
  seed_ = seed;
  sliced_pass_ = train && batch_shard_ && batch_shard_->size() > 1;
  B_ = B;
  T_ = T;
  saturated_ = 0;
  cast_elements_ = 0;
  attention_outliers_ = attention_split_elements_ = 0;
  for (Block& b : blocks_)
    for (LinearLayer* l : {b.c_attn.get(), b.c_proj.get(), b.c_fc.get(), b.mlp_proj.get()}) l->reset_counts();
  tokens_.assign(tokens, tokens + B * T);

  Tensor h = embedding_forward(tokens, B, T, wte_->value, wpe_->value);
  for (int l = 0; l < cfg_.n_layer; ++l) {
    Block& b = blocks_[static_cast<std::size_t>(l)];
    h = block_forward(b, l, std::move(h));
    if (!train) {
      // Evaluation (and a distillation teacher) needs no backward: drop what
      // the block saved for it, so memory is one block's, not the model's.
      b.q = b.k = b.v = b.P = b.z = Tensor();
      b.ln1 = b.ln2 = LayerNormCache();
      for (LinearLayer* lin : {b.c_attn.get(), b.c_proj.get(), b.c_fc.get(), b.mlp_proj.get()}) lin->drop_saved();
    }
  }
  xf_ = layernorm_forward(h, lnf_g_->value, lnf_b_->value, prec_.a, key(1), lnf_);
  note(xf_);
  logits_ = matmul(xf_, wte_->value, Trans::N, Trans::T);  // tied head: [B*T, V]
  dlogits_ = Tensor();
  if (!targets) return 0.0;
  if (!train) return cross_entropy_loss(logits_, targets);
  CrossEntropy ce = cross_entropy(logits_, targets, prec_.e, key(2));
  dlogits_ = std::move(ce.grad);
  note(dlogits_);
  return ce.loss;
}

void GPT::backward(Tensor dlogits) {
  if (xf_.empty()) throw std::logic_error("GPT::backward: no training forward pass to differentiate");
  if (dlogits.numel() != logits_.numel()) {
    throw std::invalid_argument("GPT::backward: gradient " + dlogits.describe() + " does not match the logits " +
                                logits_.describe());
  }
  note(dlogits);
  dlogits_ = std::move(dlogits);
  backward();
}

void GPT::backward() {
  if (dlogits_.empty()) throw std::logic_error("GPT::backward: no training forward pass to differentiate");
  // Tied head: logits = x·wteᵀ, so dx = dlogits·wte and dwte += dlogitsᵀ·x.
  const Tensor dx = matmul(dlogits_, wte_->value);
  if (!wte_->frozen) wte_->accumulate(matmul(dlogits_, xf_, Trans::T, Trans::N));
  Tensor dg, db;
  Tensor dh = layernorm_backward(dx, lnf_g_->value, lnf_, dg, db, key(3));
  lnf_g_->accumulate(std::move(dg));
  lnf_b_->accumulate(std::move(db));
  for (int l = cfg_.n_layer - 1; l >= 0; --l) dh = block_backward(blocks_[static_cast<std::size_t>(l)], l, std::move(dh));
  if (!wte_->frozen || !wpe_->frozen) {
    Tensor dwte, dwpe;
    embedding_backward(tokens_.data(), B_, T_, dh, dwte, dwpe, cfg_.vocab_size, cfg_.n_ctx);
    wte_->accumulate(std::move(dwte));
    wpe_->accumulate(std::move(dwpe));
  }
  dlogits_ = Tensor();
  xf_ = Tensor();
}

std::int64_t GPT::outliers(std::int64_t* elements) const {
  std::int64_t n = attention_outliers_, e = attention_split_elements_;
  for (const Block& b : blocks_) {
    for (const LinearLayer* l : {b.c_attn.get(), b.c_proj.get(), b.c_fc.get(), b.mlp_proj.get()}) {
      n += l->outliers();
      e += l->split_elements();
    }
  }
  if (elements) *elements = e;
  return n;
}

void GPT::observe_splits(const SplitObserver& f) {
  for (Block& b : blocks_)
    for (LinearLayer* l : {b.c_attn.get(), b.c_proj.get(), b.c_fc.get(), b.mlp_proj.get()}) l->set_observer(f);
}

}  // namespace intrain
