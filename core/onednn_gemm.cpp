#include "core/onednn_gemm.h"

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

namespace intrain {
namespace {

dnnl::memory::data_type to_dnnl(GemmType t) {
  switch (t) {
    case GemmType::S8: return dnnl::memory::data_type::s8;
    case GemmType::U8: return dnnl::memory::data_type::u8;
    case GemmType::S32: return dnnl::memory::data_type::s32;
    case GemmType::F32: return dnnl::memory::data_type::f32;
  }
  return dnnl::memory::data_type::undef;
}

dnnl::memory::desc md(const GemmMatrix& m, std::int64_t batch, std::int64_t rows, std::int64_t cols) {
  return dnnl::memory::desc({batch, rows, cols}, to_dnnl(m.type),
                            dnnl::memory::dims{m.batch_stride, m.row_stride, m.col_stride});
}

// oneDNN fixes a primitive's threading when it is created, so the OpenMP
// thread count is part of the key.
using Key = std::tuple<int,                                                     // threads
                       std::int64_t, std::int64_t, std::int64_t, std::int64_t,  // batch M K N
                       int, std::int64_t, std::int64_t, std::int64_t,           // a
                       int, std::int64_t, std::int64_t, std::int64_t,           // b
                       int, std::int64_t, std::int64_t, std::int64_t>;          // c

Key key_of(const GemmDesc& d) {
  auto t = [](GemmType x) { return static_cast<int>(x); };
  return {omp_get_max_threads(), d.batch, d.M, d.K, d.N,
          t(d.a.type), d.a.batch_stride, d.a.row_stride, d.a.col_stride,
          t(d.b.type), d.b.batch_stride, d.b.row_stride, d.b.col_stride,
          t(d.c.type), d.c.batch_stride, d.c.row_stride, d.c.col_stride};
}

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mu;
  std::map<Key, std::shared_ptr<dnnl::matmul>> cache;
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

}  // namespace

void onednn_gemm(const GemmDesc& d, const void* A, const void* B, void* C) {
  if (d.batch <= 0 || d.M <= 0 || d.N <= 0) return;
  Runtime& rt = runtime();
  const auto a_md = md(d.a, d.batch, d.M, d.K);
  const auto b_md = md(d.b, d.batch, d.K, d.N);
  const auto c_md = md(d.c, d.batch, d.M, d.N);
  std::shared_ptr<dnnl::matmul> prim;
  {
    std::lock_guard<std::mutex> lock(rt.mu);
    auto& slot = rt.cache[key_of(d)];
    if (!slot) {
      try {
        dnnl::matmul::desc desc(a_md, b_md, c_md);
        dnnl::matmul::primitive_desc pd(desc, rt.engine);
        slot = std::make_shared<dnnl::matmul>(pd);
      } catch (const dnnl::error& e) {
        rt.cache.erase(key_of(d));
        throw std::runtime_error("oneDNN could not create a matmul for batch=" + std::to_string(d.batch) +
                                 " M=" + std::to_string(d.M) + " K=" + std::to_string(d.K) +
                                 " N=" + std::to_string(d.N) + ": " + e.what());
      }
    }
    prim = slot;
  }
  dnnl::memory a_mem(a_md, rt.engine, const_cast<void*>(A));
  dnnl::memory b_mem(b_md, rt.engine, const_cast<void*>(B));
  dnnl::memory c_mem(c_md, rt.engine, C);
  dnnl::stream stream(rt.engine);
  prim->execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
  stream.wait();
}

std::int64_t onednn_cache_size() {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.mu);
  return static_cast<std::int64_t>(rt.cache.size());
}

}  // namespace intrain
