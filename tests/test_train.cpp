// The training driver: checkpoints, bit-identical determinism across thread
// counts, resume after a kill, and clear errors for bad input.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstdio>
#include <csignal>
#include <cstdlib>
#include <sys/wait.h>
#include <unistd.h>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/safetensors.h"
#include "experiments/checkpoint.h"
#include "experiments/evaluate.h"
#include "experiments/quantize.h"
#include "core/gptq.h"
#include "layers/quantized_linear.h"
#include "experiments/train.h"
#include "test_support.h"
#include "tests/run_support.h"

namespace intrain {
namespace {

namespace fs = std::filesystem;
using testing::file_bytes;
using testing::fresh_dir;
using testing::run_cli;
using testing::tiny_corpus;

TrainOptions tiny_run(const fs::path& out, const std::string& format, long steps) {
  return testing::tiny_train_options(out, format, 2, 16, steps);
}

TEST(TrainCheckpoint, ModelRoundTripsThroughSafetensors) {
  const fs::path out = fresh_dir("roundtrip");
  run_train(tiny_run(out, "int8", 3));
  const SafeTensorsFile f = read_safetensors(out / "model.safetensors");
  EXPECT_EQ(f.metadata.at("n_layer"), "2");
  EXPECT_EQ(f.metadata.at("n_embd"), "32");
  EXPECT_EQ(f.metadata.at("format"), "w8a8e8g8-sr");
  EXPECT_EQ(f.at("h.1.attn.c_attn.weight").shape, (std::vector<std::int64_t>{32, 96}));
  EXPECT_EQ(f.at("h.0.mlp.c_proj.weight").shape, (std::vector<std::int64_t>{128, 32}));
  EXPECT_EQ(f.at("wpe.weight").shape, (std::vector<std::int64_t>{16, 32}));
  // Loading and saving again gives the same bytes of every tensor.
  const GPT m = load_model(out / "model.safetensors", "", Rounding::Stochastic);
  save_model(out / "again.safetensors", m, {});
  const SafeTensorsFile g = read_safetensors(out / "again.safetensors");
  for (const auto& [name, t] : f.tensors) EXPECT_EQ(g.at(name).data, t.data) << name;
  fs::remove_all(out);
}

// Integer training is exact arithmetic keyed by (seed, step, tensor, index):
// the checkpoint cannot depend on the number of threads.
TEST(TrainDeterminism, Int8CheckpointIdenticalWith1And2Threads) {
  const int saved = omp_get_max_threads();
  const fs::path a = fresh_dir("threads1"), b = fresh_dir("threads2");
  TrainOptions o1 = tiny_run(a, "int8", 3), o2 = tiny_run(b, "int8", 3);
  // Big enough that every elementwise pass spans several fixed chunks
  // (16 x 64 rows x 4*64 = 262,144 MLP elements = 16 chunks) and oneDNN splits
  // its products across both threads.
  for (TrainOptions* o : {&o1, &o2}) {
    o->batch = 16;
    o->context = 64;
    o->d_model = 64;
  }
  o1.threads = 1;
  o2.threads = 2;
  run_train(o1);
  run_train(o2);
  omp_set_num_threads(saved);
  EXPECT_EQ(file_bytes(a / "model.safetensors"), file_bytes(b / "model.safetensors"));
  EXPECT_EQ(file_bytes(a / "train_state.safetensors"), file_bytes(b / "train_state.safetensors"));
  fs::remove_all(a);
  fs::remove_all(b);
}

std::string tiny_flags(const fs::path& out, const std::string& fmt, long steps) {
  return "train --layers 2 --d-model 32 --heads 2 --context 16 --batch 4 --warmup 2 --lr 0.1 --eval-every 0 "
         "--eval-windows 4 --quiet --format " + fmt + " --steps " + std::to_string(steps) + " --data " +
         tiny_corpus().string() + " --out " + out.string();
}

// A run killed with SIGKILL after a checkpoint, then resumed, must equal an
// uninterrupted run bit for bit: same batches, same rounding streams, same
// optimizer state, and each step once in metrics.csv.
TEST(TrainResume, KilledAndResumedEqualsUninterrupted) {
  const long steps = 120;
  const fs::path full = fresh_dir("full"), part = fresh_dir("part");
  ASSERT_EQ(run_cli(tiny_flags(full, "int8", steps), nullptr), 0);
  // Start the same run with frequent checkpoints, kill it once one exists.
  const std::string cmd = std::string(INTRAIN_BINARY_DIR) + "/intrain " + tiny_flags(part, "int8", steps) +
                          " --checkpoint-every 7 > /dev/null 2>&1 & echo $!";
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[64] = {0};
  ASSERT_TRUE(std::fgets(buf, sizeof buf, p));
  ::pclose(p);
  const pid_t pid = static_cast<pid_t>(std::atol(buf));
  // Up to 120 s: a loaded machine (or a sanitizer build) starts slowly.
  for (int i = 0; i < 120000 && !fs::exists(part / "train_state.safetensors"); ++i) ::usleep(1000);
  ::usleep(20000);
  const bool killed = ::kill(pid, SIGKILL) == 0;
  for (int i = 0; i < 1000 && ::kill(pid, 0) == 0; ++i) ::usleep(1000);  // reaped by init
  ASSERT_TRUE(fs::exists(part / "train_state.safetensors"));
  const long resumed_from = std::stol(read_safetensors(part / "train_state.safetensors").metadata.at("step"));
  std::printf("  killed=%d, resuming from step %ld of %ld\n", killed, resumed_from, steps);
  std::string out;
  ASSERT_EQ(run_cli(tiny_flags(part, "int8", steps) + " --checkpoint-every 7 --resume", &out), 0) << out;
  EXPECT_EQ(file_bytes(full / "model.safetensors"), file_bytes(part / "model.safetensors"));
  EXPECT_EQ(file_bytes(full / "train_state.safetensors"), file_bytes(part / "train_state.safetensors"));
  std::ifstream m(part / "metrics.csv");
  std::string line;
  long rows = 0, expect_step = 0;
  std::getline(m, line);  // header
  while (std::getline(m, line)) {
    EXPECT_EQ(std::stol(line.substr(0, line.find(','))), expect_step++);
    ++rows;
  }
  EXPECT_EQ(rows, steps);
  fs::remove_all(full);
  fs::remove_all(part);
}

TEST(TrainErrors, RefusesToOverwriteAndToResumeNothing) {
  const fs::path out = fresh_dir("errors");
  run_train(tiny_run(out, "int8", 1));
  EXPECT_THROW(run_train(tiny_run(out, "int8", 1)), std::runtime_error);  // would overwrite
  TrainOptions other = tiny_run(out, "int16", 2);
  other.resume = true;
  EXPECT_THROW(run_train(other), std::runtime_error);  // different format
  TrainOptions none = tiny_run(fresh_dir("nothing"), "int8", 1);
  none.resume = true;
  EXPECT_THROW(run_train(none), std::runtime_error);
  fs::remove_all(out);
}

// Early stopping: the run stops once the periodic validation loss has not
// improved for `early_stop` evaluations, and best.safetensors is the model of
// the best evaluation (its loss, re-evaluated, is the best in metrics.csv).
TEST(TrainEarlyStop, StopsAfterThePatienceAndKeepsTheBestModel) {
  const fs::path out = fresh_dir("early_stop");
  TrainOptions o = testing::tiny_train_options(out, "fp32", 1, 16, 3000);
  o.lr = 0.3;  // over-fits the tiny corpus within a few hundred steps
  o.eval_every = 20;
  o.eval_windows = 8;
  o.early_stop = 3;
  o.final_eval_windows = 8;
  o.threads = 1;
  run_train(o);
  std::ifstream in(out / "summary.json");
  const nlohmann::json es = nlohmann::json::parse(in).at("early_stop");
  ASSERT_TRUE(es["stopped_early"].get<bool>()) << es.dump();
  const long best = es["best_step"], stopped = es["stopped_at_step"];
  EXPECT_EQ(stopped, best + 3 * 20) << "three evaluations without a new best, then stop";
  // metrics.csv: the best periodic loss is at best_step, and nothing after the stop.
  std::ifstream m(out / "metrics.csv");
  std::string line;
  std::getline(m, line);
  double min_val = INFINITY;
  long min_step = -1, rows = 0;
  while (std::getline(m, line)) {
    ++rows;
    const long step = std::stol(line.substr(0, line.find(',')));
    const std::size_t c1 = line.find(','), c2 = line.find(',', c1 + 1), c3 = line.find(',', c2 + 1);
    const std::string val = line.substr(c2 + 1, c3 - c2 - 1);
    if (!val.empty() && step + 1 < stopped && std::stod(val) < min_val) {
      min_val = std::stod(val);
      min_step = step + 1;
    }
  }
  EXPECT_EQ(rows, stopped);
  EXPECT_EQ(min_step, best);
  EXPECT_NEAR(es["best_val_loss"].get<double>(), min_val, 1e-6);  // metrics.csv prints 6 decimals
  // The kept model re-evaluates to the best loss on the same windows.
  EvalOptions ev;
  ev.model = out / "best.safetensors";
  ev.data = tiny_corpus();
  ev.max_windows = 8;
  ev.batch = o.batch;
  ev.threads = 1;
  // Same windows and batch; 1e-5: fp32 matmuls may block differently in another process.
  EXPECT_NEAR(run_eval(ev)["loss"].get<double>(), es["best_val_loss"].get<double>(), 1e-5);
  fs::remove_all(out);
}

// The CLI: bad flags and a corrupt checkpoint exit non-zero with a message.
TEST(TrainCli, BadFlagsExitNonZeroWithAMessage) {
  std::string out;
  EXPECT_NE(run_cli("train --format int17 --steps 1 --out /tmp/intrain_cli_x", &out), 0);
  EXPECT_NE(out.find("int17"), std::string::npos) << out;
  EXPECT_NE(run_cli("train --heads 3 --d-model 128 --steps 1 --out /tmp/intrain_cli_y", &out), 0);
  EXPECT_NE(out.find("--heads"), std::string::npos) << out;
  EXPECT_NE(run_cli("train --steps 0", &out), 0);
  EXPECT_NE(run_cli("train --data /nonexistent/file.txt --steps 1 --out /tmp/intrain_cli_z", &out), 0);
  EXPECT_NE(out.find("/nonexistent/file.txt"), std::string::npos) << out;
  EXPECT_NE(run_cli("frobnicate", &out), 0);
}

TEST(TrainCli, CorruptCheckpointExitsNonZero) {
  const fs::path bad = fs::temp_directory_path() / "intrain_corrupt.safetensors";
  {
    std::ofstream f(bad, std::ios::binary);
    f << "this is not a safetensors file at all";
  }
  std::string out;
  EXPECT_NE(run_cli("eval --model " + bad.string(), &out), 0);
  EXPECT_NE(out.find(bad.string()), std::string::npos) << out;
  // A valid safetensors file that is not an intrain model.
  SafeTensorsFile f;
  f.add("x", SafeTensor::from_values<float>({2}, std::vector<float>{1.0f, 2.0f}));
  write_safetensors(bad, f);
  EXPECT_NE(run_cli("eval --model " + bad.string(), &out), 0);
  EXPECT_NE(out.find("n_layer"), std::string::npos) << out;
  fs::remove(bad);
}

TEST(TrainCli, EvalPrintsOneJsonObject) {
  const fs::path out = fresh_dir("evaljson");
  run_train(tiny_run(out, "fp32", 2));
  std::string text;
  ASSERT_EQ(run_cli("eval --model " + (out / "model.safetensors").string() + " --data " + tiny_corpus().string(), &text), 0)
      << text;
  const auto j = nlohmann::json::parse(text);
  for (const char* k : {"loss", "perplexity", "bits_per_byte", "tokens"}) EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_NEAR(j["perplexity"].get<double>(), std::exp(j["loss"].get<double>()), 1e-9);
  fs::remove_all(out);
}

// intrain quantize writes packed weights that load back as QuantizedLinear:
// an RTN file gives exactly the loss of the same quantization done in memory
// (same packed bits, same fp32 code), and a GPTQ file records its settings.
TEST(QuantizeCli, PackedFileLoadsAsQuantizedLinear) {
  const fs::path dir = fresh_dir("quantize");
  run_train(tiny_run(dir, "fp32", 20));
  const fs::path model = dir / "model.safetensors";
  QuantizeOptions q;
  q.model = model;
  q.bits = 3;
  q.group = 32;
  q.data = tiny_corpus();
  q.calib_tokens = 256;
  q.threads = 1;
  for (const char* method : {"rtn", "gptq"}) {
    q.method = method;
    q.out = dir / (std::string(method) + ".safetensors");
    const nlohmann::json summary = run_quantize(q);
    EXPECT_NEAR(summary["bits_per_weight"].get<double>(), 3.0 + (16.0 + 3.0) / 32.0, 1e-12);
    const SafeTensorsFile f = read_safetensors(q.out);
    EXPECT_FALSE(f.contains("h.0.mlp.c_fc.weight"));
    EXPECT_TRUE(f.contains("h.0.mlp.c_fc.bias"));
    EXPECT_EQ(f.metadata.at("quant.method"), method);
    EXPECT_EQ(f.metadata.at("quant.calib_tokens"), std::string(method) == "gptq" ? "256" : "0");
    GPT loaded = load_model(q.out, "", Rounding::Nearest);
    EXPECT_TRUE(loaded.param("h.1.attn.c_attn.weight").master.empty());  // no float copy kept

    GPT reference = load_model(model, "", Rounding::Nearest);
    for (const std::string& m : reference.linear_modules()) {
      const Param& w = reference.param(m + ".weight");
      const std::vector<float> W(w.value.data<float>(), w.value.data<float>() + w.value.numel());
      const PackedWeights stored = read_packed(f, m, w.value.rows(), w.value.cols());
      if (std::string(method) == "rtn") {
        EXPECT_EQ(stored, quantize_rtn(W, w.value.rows(), w.value.cols(), 3, 32)) << m;
      }
      reference.replace_linear(m, std::make_unique<QuantizedLinear>(m, stored, &reference.param(m + ".bias")));
    }
    std::vector<std::int32_t> x(2 * 16), y(2 * 16);
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = 'a' + static_cast<std::int32_t>(i % 26);
      y[i] = 'a' + static_cast<std::int32_t>((i + 1) % 26);
    }
    EXPECT_EQ(loaded.forward(x.data(), y.data(), 2, 16, 0, 1, false), reference.forward(x.data(), y.data(), 2, 16, 0, 1, false));
    // The integer engine runs the packed file as well; its loss differs from
    // fp32 by its own activation rounding (4e-4 relative when written;
    // 1e-2 allowed).
    GPT int8 = load_model(q.out, "int8", Rounding::Nearest);
    const double li = int8.forward(x.data(), y.data(), 2, 16, 0, 1, false), lf = loaded.forward(x.data(), y.data(), 2, 16, 0, 1, false);
    std::printf("  %s: fp32 loss %.6f, int8 loss %.6f\n", method, lf, li);
    EXPECT_NEAR(li, lf, 1e-2 * lf);
  }
  GPT loaded = load_model(dir / "rtn.safetensors", "", Rounding::Nearest);
  EXPECT_THROW(save_model(dir / "resaved.safetensors", loaded, {}), std::invalid_argument);  // no float weights to write
  q.out = dir / "again.safetensors";
  q.group = 24;
  const std::string m = testing::thrown_message<std::invalid_argument>([&] { (void)run_quantize(q); });
  EXPECT_MESSAGE_HAS(m, "--group 24 must be a multiple of 8");
  q.group = 32;
  q.model = dir / "rtn.safetensors";
  EXPECT_THROW((void)run_quantize(q), std::invalid_argument);  // already quantized
  fs::remove_all(dir);
}

}  // namespace
}  // namespace intrain
