// outlier_stats: per linear layer and role, how the operands of a trained
// model's training step look to the outlier split (core/outliers.h).
//
// Loads a model.safetensors written by `intrain train`, runs `--batches`
// training steps' forward and backward passes (no update) on batches of the
// training split with outlier tiling of roles a and e at `--threshold`, and
// records for every split that a linear layer makes, per (layer, role):
//   elements, outliers, fraction          summed over the batches
//   max_over_median                      max|x| / median|x| of the 16-bit source (mean over batches)
//   row_fraction, channel_fraction       share of rows (tokens) / columns (channels) holding an outlier
//   channels                             outlier count per channel (column), the top 16
// and writes them to --out as JSON; analysis/plot_outliers.py plots them.
//
//   build/outlier_stats --model runs/x/model.safetensors --out runs/x/outliers.json
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "core/outliers.h"
#include "experiments/checkpoint.h"
#include "experiments/corpus.h"

namespace {

struct Record {
  std::int64_t elements = 0, outliers = 0, rows_with = 0, rows = 0, cols_with = 0, cols = 0;
  double ratio_sum = 0;
  std::int64_t ratio_count = 0;
  std::vector<std::int64_t> per_channel;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Outlier statistics of a trained intrain model, per linear layer and role"};
  std::string model_path, out = "outliers.json", format = "int8", threshold = "rms:5", data;
  int batches = 4, batch = 16;
  std::uint64_t seed = 1;
  app.add_option("--model", model_path, "model.safetensors written by intrain train")->required();
  app.add_option("--format", format, "Integer format to run the step in (the split's source is 16-bit)");
  app.add_option("--threshold", threshold, "Outlier rule: rms:G, pct:P or top:K");
  app.add_option("--batches", batches, "Training batches to measure")->check(CLI::Range(1, 1000));
  app.add_option("--batch", batch, "Sequences per batch")->check(CLI::Range(1, 4096));
  app.add_option("--seed", seed, "Seed of the batches and the rounding");
  app.add_option("--data", data, "Training text (default: the KJV)");
  app.add_option("--out", out, "JSON output");
  CLI11_PARSE(app, argc, argv);
  try {
    const intrain::OutlierTiling tiling = intrain::OutlierTiling::parse("a,e", threshold);
    intrain::GPT model = intrain::load_model(model_path, format + "+" + tiling.name(), intrain::Rounding::Stochastic);
    const int T = model.config().n_ctx;
    const intrain::Corpus corpus =
        intrain::Corpus::load(data.empty() ? std::nullopt : std::optional<std::filesystem::path>(data), T + 1);
    std::map<std::pair<std::string, char>, Record> rec;
    std::vector<std::string> order;
    model.observe_splits([&](const std::string& name, char role, const intrain::Tensor& x, const intrain::OutlierSplit& s) {
      auto [it, fresh] = rec.try_emplace({name, role});
      if (fresh) order.push_back(name + ":" + role);
      Record& r = it->second;
      const std::int64_t rows = x.rows(), cols = x.cols();
      r.elements += x.numel();
      r.outliers += s.outliers();
      r.per_channel.resize(static_cast<std::size_t>(cols), 0);
      std::vector<bool> row_has(static_cast<std::size_t>(rows), false), col_has(static_cast<std::size_t>(cols), false);
      for (std::size_t q = 0; q < s.index.size(); ++q) {
        row_has[static_cast<std::size_t>(s.row[q])] = true;
        col_has[static_cast<std::size_t>(s.col[q])] = true;
        ++r.per_channel[static_cast<std::size_t>(s.col[q])];
      }
      r.rows += rows;
      r.cols += cols;
      r.rows_with += std::count(row_has.begin(), row_has.end(), true);
      r.cols_with += std::count(col_has.begin(), col_has.end(), true);
      const std::int64_t median = intrain::kth_largest_abs(x, (x.numel() + 1) / 2);
      if (median > 0) {
        r.ratio_sum += static_cast<double>(s.source_max) / static_cast<double>(median);
        ++r.ratio_count;
      }
    });
    std::vector<std::int32_t> xb(static_cast<std::size_t>(batch) * T), yb(xb.size());
    for (int b = 0; b < batches; ++b) {
      intrain::sample_batch(corpus.train, seed, static_cast<std::uint64_t>(b), batch, T, xb.data(), yb.data());
      model.forward(xb.data(), yb.data(), batch, T, static_cast<std::uint64_t>(b), seed, true);
      model.backward();
    }
    nlohmann::json j;
    j["model"] = model_path;
    j["format"] = model.precision().name();
    j["threshold"] = tiling.policy.name();
    j["batches"] = batches;
    j["tokens_per_batch"] = batch * T;
    nlohmann::json layers = nlohmann::json::array();
    for (const auto& [key, r] : rec) {
      std::vector<std::pair<std::int64_t, std::int64_t>> ch;
      for (std::size_t c = 0; c < r.per_channel.size(); ++c)
        if (r.per_channel[c]) ch.emplace_back(r.per_channel[c], static_cast<std::int64_t>(c));
      std::sort(ch.rbegin(), ch.rend());
      nlohmann::json top = nlohmann::json::array();
      for (std::size_t q = 0; q < std::min<std::size_t>(16, ch.size()); ++q) top.push_back({{"channel", ch[q].second}, {"outliers", ch[q].first}});
      layers.push_back({{"layer", key.first},
                        {"role", std::string(1, key.second)},
                        {"elements", r.elements},
                        {"outliers", r.outliers},
                        {"fraction", static_cast<double>(r.outliers) / static_cast<double>(r.elements)},
                        {"max_over_median", r.ratio_count ? nlohmann::json(r.ratio_sum / static_cast<double>(r.ratio_count)) : nlohmann::json()},
                        {"row_fraction", static_cast<double>(r.rows_with) / static_cast<double>(r.rows)},
                        {"channel_fraction", static_cast<double>(r.cols_with) / static_cast<double>(r.cols)},
                        {"channels_with_outliers", static_cast<std::int64_t>(ch.size())},
                        {"top_channels", top}});
    }
    j["layers"] = layers;
    std::ofstream f(out);
    f << j.dump(2) << '\n';
    if (!f) throw std::runtime_error(out + ": cannot write");
    std::fprintf(stderr, "wrote %s (%zu layer/role entries)\n", out.c_str(), rec.size());
  } catch (const std::exception& e) {
    std::cerr << "outlier_stats: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
