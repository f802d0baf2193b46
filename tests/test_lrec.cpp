// `intrain lrec` and `intrain reproduce int21` end to end on a tiny model:
// LREC lowers the KL to the teacher, its model file reloads with the
// adapters, bad input fails clearly, and a reproduction resumes.
#include <gtest/gtest.h>

#include <fstream>
#include <cmath>
#include <iterator>
#include <map>
#include <sstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "run_support.h"

namespace intrain {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::fresh_dir;
using testing::run_cli;

json read(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

// A trained tiny teacher and its INT2 RTN quantization, shared by the tests.
struct TinySetup {
  fs::path dir, teacher, quantized;
  TinySetup() : dir(fresh_dir("lrec")) {
    fs::create_directories(dir);
    TrainOptions o = testing::tiny_train_options(dir / "teacher", "fp32", 1, 16, 60);
    o.final_eval_windows = 4;
    run_train(o);
    teacher = dir / "teacher" / "model.safetensors";
    quantized = dir / "q2.safetensors";
    std::string out;
    EXPECT_EQ(run_cli("quantize --model " + teacher.string() + " --bits 2 --group 8 --method rtn --out " +
                          quantized.string(),
                      &out),
              0)
        << out;
  }
  // lr 0.2: the default 0.5 (tuned at d = 256) is past the edge of stability
  // for this d = 32 model: there the float LoRA reference diverges as well
  // (KL 0.012 -> 2.6 in 40 steps, measured), at 0.2 every format cuts it by
  // about three quarters.
  std::string lrec_args(const fs::path& out, int steps = 40) const {
    return "lrec --teacher " + teacher.string() + " --quantized " + quantized.string() + " --data " +
           testing::tiny_corpus().string() + " --rank 2 --steps " + std::to_string(steps) + " --batch 8 --lr 0.2 --eval-windows 16 --threads 1 --quiet --out " +
           out.string();
  }
};

const TinySetup& setup() {
  static const TinySetup s;
  return s;
}

TEST(LrecCli, LowersTheKlAndItsModelReloadsWithTheAdapters) {
  const TinySetup& s = setup();
  const fs::path out = s.dir / "run";
  std::string log;
  ASSERT_EQ(run_cli(s.lrec_args(out), &log), 0) << log;
  const json sum = read(out / "summary.json");
  const double before = sum["before"]["kl_mean"], after = sum["after"]["kl_mean"];
  EXPECT_GT(before, 0.0);
  EXPECT_LT(after, 0.8 * before) << "LREC should cut the KL of an INT2 model by at least a fifth in 40 steps";
  EXPECT_GT(sum["bits"]["adapter_bits_per_weight"].get<double>(), 0.0);
  // The written model holds the adapters: evaluated again, it gives the KL
  // LREC reported after training, bit for bit (same windows, same keys).
  ASSERT_EQ(run_cli("eval --model " + (out / "model.safetensors").string() + " --teacher " + s.teacher.string() +
                        " --data " + testing::tiny_corpus().string() + " --max-windows 16 --batch 8 --threads 1",
                    &log),
            0)
      << log;
  const json ev = json::parse(log.substr(log.find('{')));
  EXPECT_EQ(ev["kl_mean"].get<double>(), after);
  // A second run into the same folder refuses to overwrite it.
  EXPECT_NE(run_cli(s.lrec_args(out), &log), 0);
  EXPECT_NE(log.find("--overwrite"), std::string::npos) << log;
}

// --teacher-storage fp16 holds the teacher's block linears in binary16: the
// teacher's bytes drop by exactly 2 per linear weight, and its target moves
// by far less than what LREC corrects. `eval --storage fp16` measures that
// move: the fp16-held model against the same checkpoint in fp32.
TEST(LrecCli, Fp16TeacherHalvesItsLinearsAndBarelyMovesTheTarget) {
  const TinySetup& s = setup();
  std::string log;
  const fs::path a = s.dir / "teacher32", b = s.dir / "teacher16";
  ASSERT_EQ(run_cli(s.lrec_args(a, 2), &log), 0) << log;
  ASSERT_EQ(run_cli(s.lrec_args(b, 2) + " --teacher-storage fp16", &log), 0) << log;
  const json sa = read(a / "summary.json"), sb = read(b / "summary.json");
  EXPECT_EQ(sa["config"]["teacher_storage"], "fp32");
  EXPECT_EQ(sb["config"]["teacher_storage"], "fp16");
  const json meta = read(s.dir / "teacher" / "summary.json")["config"];
  const std::int64_t L = meta["layers"], C = meta["d_model"];
  const double linear_weights = static_cast<double>(L * 12 * C * C);  // c_attn 3C², c_proj C², c_fc and proj 4C² each
  EXPECT_NEAR((sa["memory"]["teacher_params_mib"].get<double>() - sb["memory"]["teacher_params_mib"].get<double>()) * 1048576.0,
              2.0 * linear_weights, 1e-6);
  ASSERT_EQ(run_cli("eval --model " + s.teacher.string() + " --storage fp16 --teacher " + s.teacher.string() + " --data " +
                        testing::tiny_corpus().string() + " --max-windows 16 --batch 8 --threads 1",
                    &log),
            0)
      << log;
  const json ev = json::parse(log.substr(log.find('{')));
  EXPECT_EQ(ev["storage"], "fp16");
  // fp16 rounds each weight by at most 2^-11 relative: the logits move by
  // about that much, so the KL, quadratic in the move, is far below 1e-4
  // nats (measured 1.1e-7 on the full run's teacher), and below the
  // quantized model's KL by orders of magnitude.
  EXPECT_GT(ev["kl_mean"].get<double>(), 0.0);
  EXPECT_LT(ev["kl_mean"].get<double>(), 1e-4);
  EXPECT_LT(ev["kl_mean"].get<double>(), 1e-3 * sa["before"]["kl_mean"].get<double>());
  EXPECT_NE(run_cli(s.lrec_args(s.dir / "bad16", 2) + " --teacher-storage fp8", &log), 0);
  EXPECT_NE(log.find("--teacher-storage"), std::string::npos) << log;
}

// The effective-bits breakdown accounts for every byte of the file LREC
// writes: the categories plus the header are the file size exactly, and the
// effective bits are the packed codes, scales, zeros and adapters (plus one
// exponent byte per adapter tensor, kept in the header's metadata).
TEST(LrecCli, EffectiveBitsAddUpToTheFileOnDisk) {
  const TinySetup& s = setup();
  const fs::path out = s.dir / "bits";
  std::string log;
  ASSERT_EQ(run_cli(s.lrec_args(out, 2), &log), 0) << log;
  const json sum = read(out / "summary.json");
  const json& st = sum["storage"];
  std::int64_t total = st["header_bytes"].get<std::int64_t>();
  for (const auto& [k, v] : st["bytes"].items()) total += v.get<std::int64_t>();
  EXPECT_EQ(total, static_cast<std::int64_t>(fs::file_size(out / "model.safetensors")));
  EXPECT_EQ(st["file_bytes"].get<std::int64_t>(), total);
  EXPECT_GT(st["bytes"]["packed_codes"].get<std::int64_t>(), 0);
  EXPECT_GT(st["bytes"]["adapters"].get<std::int64_t>(), 0);
  EXPECT_EQ(st["bytes"]["other"].get<std::int64_t>(), 0) << "a tensor of no known kind: " << st.dump(1);
  // 1 block x 4 linears x (A, B) adapter tensors, one exponent byte each.
  const double n = sum["bits"]["base_weights"], adapter_exponents = 8.0 * 8;
  const double counted = 8.0 * (st["bytes"]["packed_codes"].get<double>() + st["bytes"]["scales_and_zeros"].get<double>() +
                                st["bytes"]["adapters"].get<double>()) + adapter_exponents;
  // Exact in double: every term is an integer below 2^53.
  EXPECT_EQ(sum["bits"]["effective_bits"].get<double>() * n, counted);
}

// Gradient clipping (optim/grad_clip.h) adds no rounding: a limit the run
// never reaches gives the same model file, byte for byte, as no clipping,
// and a limit under every step's norm clips every step (and is reported).
TEST(LrecCli, GradientClippingChangesNothingUntilItTriggers) {
  const TinySetup& s = setup();
  auto run = [&](const std::string& name, const std::string& clip) {
    const fs::path out = s.dir / name;
    std::string log;
    EXPECT_EQ(run_cli(s.lrec_args(out, 6) + " --clip-grad-norm " + clip, &log), 0) << log;
    return out;
  };
  auto bytes = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const fs::path off = run("clip-off", "0"), high = run("clip-high", "1e6"), low = run("clip-low", "1e-6");
  EXPECT_EQ(read(off / "summary.json")["clipped_steps"], 0);
  EXPECT_EQ(read(high / "summary.json")["clipped_steps"], 0);
  EXPECT_EQ(bytes(off / "model.safetensors"), bytes(high / "model.safetensors"));
  const json sl = read(low / "summary.json");
  EXPECT_EQ(sl["clipped_steps"], 6);
  EXPECT_EQ(sl["config"]["clip_grad_norm"], 1e-6);
  EXPECT_NE(bytes(off / "model.safetensors"), bytes(low / "model.safetensors"));
  // metrics.csv: the first step's norm is measured before any update, so it
  // is the same in both runs; the low limit's shift brings it under 1e-6.
  auto first_row = [](const fs::path& p) {
    std::ifstream in(p / "metrics.csv");
    std::string header, row;
    std::getline(in, header);
    std::getline(in, row);
    EXPECT_EQ(header, "step,loss,kl,ce,lr,grad_norm,clip_shift,tokens_per_s");
    std::vector<std::string> f;
    std::stringstream ss(row);
    for (std::string x; std::getline(ss, x, ',');) f.push_back(x);
    return f;
  };
  const auto a = first_row(off), b = first_row(low);
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 8u);
  EXPECT_EQ(a[5], b[5]);
  EXPECT_EQ(a[6], "0");
  const double norm = std::stod(b[5]);
  const int shift = std::stoi(b[6]);
  EXPECT_GT(norm, 1e-6);
  EXPECT_LE(std::ldexp(norm, -shift), 1e-6);
  EXPECT_GT(std::ldexp(norm, -shift), 0.5e-6);
}

TEST(LrecCli, BadInputNamesTheFlag) {
  const TinySetup& s = setup();
  std::string log;
  // A quantized file as the teacher, a missing quantized file, a bad rank.
  EXPECT_NE(run_cli("lrec --teacher " + s.quantized.string() + " --quantized " + s.quantized.string() + " --out " +
                        (s.dir / "bad1").string(),
                    &log),
            0);
  EXPECT_NE(log.find("--teacher"), std::string::npos) << log;
  EXPECT_NE(run_cli("lrec --teacher " + s.teacher.string() + " --quantized " + (s.dir / "missing.safetensors").string() +
                        " --out " + (s.dir / "bad2").string(),
                    &log),
            0);
  EXPECT_NE(log.find("missing.safetensors"), std::string::npos) << log;
  EXPECT_NE(run_cli("lrec --teacher " + s.teacher.string() + " --quantized " + s.quantized.string() + " --rank 0", &log), 0);
  EXPECT_NE(log.find("--rank"), std::string::npos) << log;
  // 16-bit errors cannot pass the packed base: refused before any work, naming the flag and the fix.
  EXPECT_NE(run_cli("lrec --teacher " + s.teacher.string() + " --quantized " + s.quantized.string() + " --format int16 --out " +
                        (s.dir / "bad3").string(),
                    &log),
            0);
  EXPECT_NE(log.find("--format int16"), std::string::npos) << log;
  EXPECT_NE(log.find("e8"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(s.dir / "bad3" / "summary.json"));
}

// AdpQ's salient part (core/salient_weights.h) counts in the effective bits
// and has its own storage category.
TEST(LrecCli, EffectiveBitsCountAdpqSalientWeights) {
  const TinySetup& s = setup();
  const fs::path q = s.dir / "adpq2.safetensors", out = s.dir / "bits-adpq";
  std::string log;
  ASSERT_EQ(run_cli("quantize --model " + s.teacher.string() + " --bits 2 --group 8 --method adpq --out " + q.string(), &log), 0) << log;
  ASSERT_EQ(run_cli("lrec --teacher " + s.teacher.string() + " --quantized " + q.string() + " --data " +
                        testing::tiny_corpus().string() + " --rank 2 --steps 2 --batch 8 --eval-windows 4 --threads 1 --quiet --out " +
                        out.string(),
                    &log),
            0)
      << log;
  const json sum = read(out / "summary.json");
  const json& st = sum["storage"];
  EXPECT_GT(st["bytes"]["salient"].get<std::int64_t>(), 0);
  EXPECT_EQ(st["bytes"]["other"].get<std::int64_t>(), 0) << st.dump(1);
  const double n = sum["bits"]["base_weights"], adapter_exponents = 8.0 * 8;
  const double counted = 8.0 * (st["bytes"]["packed_codes"].get<double>() + st["bytes"]["scales_and_zeros"].get<double>() +
                                st["bytes"]["salient"].get<double>() + st["bytes"]["adapters"].get<double>()) + adapter_exponents;
  // Not exact: for each of the 4 linears, bits_per_weight() counts the 32-bit
  // entry count (kept in the header's metadata) but not the padding of the
  // four bit streams to whole bytes (< 8 bits each): the two differ by at
  // most 4 x 32 bits one way and 4 x 4 x 7 the other.
  EXPECT_NEAR(sum["bits"]["effective_bits"].get<double>() * n, counted, 4.0 * 32);
}

// `intrain ablate --lrec-*`: a bit-width sweep of LREC on one packed model.
// Every cell is an `intrain lrec` run; the report's loss is each cell's
// validation KL after LREC, the fp32 cell is the float LoRA reference, and a
// second run recomputes nothing.
TEST(AblateLrec, SweepsTheAdapterBitsAgainstTheFloatReference) {
  const TinySetup& s = setup();
  const fs::path out = s.dir / "ablate-lrec";
  const std::string args = "ablate --lrec-teacher " + s.teacher.string() + " --lrec-quantized " + s.quantized.string() +
                           " --lrec-steps 8 --lrec-eval-windows 8 --bits 8,4 --rounding stochastic --seeds 1 --data " +
                           testing::tiny_corpus().string() + " --no-plots --out " + out.string();
  std::string log;
  ASSERT_EQ(run_cli(args, &log), 0) << log;
  const json report = read(out / "ablation.json");
  ASSERT_EQ(report["settings"]["kind"], "lrec");
  std::map<std::string, double> kl;
  for (const json& c : report["cells"]) {
    ASSERT_EQ(c["status"], "done") << c.dump();
    const json sum = read(out / "cells" / c["name"].get<std::string>() / "summary.json");
    EXPECT_EQ(c["final_val_loss"].get<double>(), sum["after"]["kl_mean"].get<double>()) << c["name"];
    kl[c["name"].get<std::string>()] = c["final_val_loss"].get<double>();
  }
  ASSERT_EQ(kl.size(), 3u);  // fp32_s1, int8-sr_s1, int4-sr_s1
  EXPECT_EQ(read(out / "cells" / "fp32_s1" / "summary.json")["config"]["adapter_format"], "fp32");
  EXPECT_EQ(read(out / "cells" / "int4-sr_s1" / "summary.json")["config"]["format"], "w4a4e4g4-sr");
  const std::string md = testing::file_bytes(out / "ablation.md");
  EXPECT_NE(md.find("Bit-width ablation of LREC"), std::string::npos) << md;
  // Resuming: nothing is recomputed.
  const std::string before = testing::file_bytes(out / "cells" / "int8-sr_s1" / "summary.json");
  ASSERT_EQ(run_cli(args, &log), 0) << log;
  EXPECT_NE(log.find("3 already finished, 0 to run"), std::string::npos) << log;
  EXPECT_EQ(testing::file_bytes(out / "cells" / "int8-sr_s1" / "summary.json"), before);
  // Bad input names the flag.
  EXPECT_NE(run_cli("ablate --lrec-teacher " + s.teacher.string() + " --out " + (s.dir / "x").string(), &log), 0);
  EXPECT_NE(log.find("--lrec-quantized"), std::string::npos) << log;
  EXPECT_NE(run_cli("ablate --lrec-steps 5 --out " + (s.dir / "y").string(), &log), 0);
  EXPECT_NE(log.find("--lrec-teacher"), std::string::npos) << log;
}

TEST(ReproduceCli, WritesTheTableAndResumesWithoutRecomputing) {
  const TinySetup& s = setup();
  const fs::path out = s.dir / "int21";
  const std::string args = "reproduce int21 --teacher " + s.teacher.string() + " --data " + testing::tiny_corpus().string() +
                           " --out " + out.string() +
                           " --methods rtn --bits 2,4 --group 8 --rank 1 --sweep-ranks 2 --lrec-steps 10 --batch 4"
                           " --eval-windows 8 --calib-tokens 256 --memory-widths 16 --memory-batches 1 --jobs 2 --no-plots";
  std::string log;
  ASSERT_EQ(run_cli(args, &log), 0) << log;
  const json r = read(out / "int21.json");
  ASSERT_EQ(r["rows"].size(), 2u);
  for (const json& row : r["rows"]) {
    for (const char* k : {"bits", "method", "ppl_quantized", "ppl_lrec", "ppl_float", "kl_quantized", "kl_lrec",
                          "top1_quantized", "top1_lrec", "effective_bits", "peak_rss_mib",
                          // the float-LoRA and KL-only references (docs/fidelity.md), named as the issue asks
                          "kl_lrec_float_lora", "kl_lrec_kl_only", "kl_reduction", "kl_reduction_float_lora",
                          "top1_lrec_float_lora", "top5_lrec", "kld_p99_lrec", "ppl_lrec_kl_only"})
      EXPECT_TRUE(row.contains(k)) << k;
    // The references really are other runs: a float student, and CE weight 0.
    const std::string n = "rtn-int" + row["bits"].dump() + "-r1";
    const json fl = read(out / "lrec" / (n + "-float-lora") / "summary.json");
    const json ko = read(out / "lrec" / (n + "-kl-only") / "summary.json");
    EXPECT_EQ(fl["config"]["adapter_format"], "fp32");
    EXPECT_EQ(fl["config"]["format"], "fp32");
    EXPECT_EQ(ko["config"]["ce_weight"].get<double>(), 0.0);
    EXPECT_NE(row["kl_lrec_kl_only"].get<double>(), row["kl_lrec"].get<double>());
  }
  EXPECT_EQ(r["rank_sweep"].size(), 2u);  // ranks 1 (the table's) and 2
  EXPECT_TRUE(r.contains("memory"));
  EXPECT_TRUE(r["memory"].contains("ratio_lrec_fp16_teacher_to_full"));
  // Memory against model size: one width, one batch, both teacher storages,
  // each ratio against the fp32 run's peak before its checkpoint.
  ASSERT_EQ(r["memory_scale"].size(), 1u);
  const json& ms = r["memory_scale"][0];
  EXPECT_EQ(ms["d_model"], 16);
  EXPECT_EQ(ms["batch"], 1);
  EXPECT_DOUBLE_EQ(ms["ratio_fp16_teacher"].get<double>(),
                   ms["int_lrec_fp16_teacher"].get<double>() / ms["fp32_full_finetune"].get<double>());
  const json l16 = read(out / "memory" / "d16" / "int-lrec-fp16-teacher-b1" / "summary.json");
  EXPECT_EQ(l16["config"]["teacher_storage"], "fp16");
  EXPECT_EQ(read(out / "memory" / "d16" / "int-lrec-fp32-teacher-b1" / "summary.json")["config"]["teacher_storage"], "fp32");
  EXPECT_FALSE(fs::exists(out / "memory" / "d16" / "model" / "train_state.safetensors"));
  EXPECT_TRUE(fs::exists(out / "int21.md"));
  // Again: every stage is found finished, nothing runs, the table is the same.
  ASSERT_EQ(run_cli(args, &log), 0) << log;
  EXPECT_EQ(log.find("reproduce: ["), std::string::npos) << "a finished stage ran again:\n" << log;
  EXPECT_EQ(read(out / "int21.json")["rows"], r["rows"]);
  // Different settings into the same folder are refused.
  EXPECT_NE(run_cli(args + " --lr 0.9", &log), 0);
  EXPECT_NE(log.find("lr"), std::string::npos) << log;
}

}  // namespace
}  // namespace intrain
