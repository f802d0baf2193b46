#include "core/precision.h"

#include <regex>
#include <stdexcept>

namespace intrain {

std::string Precision::name() const {
  if (is_float()) return "fp32";
  std::string s = "w" + std::to_string(w.bits()) + "a" + std::to_string(a.bits()) + "e" + std::to_string(e.bits()) +
                  "g" + std::to_string(g.bits());
  if (tiling.any()) s += "+" + tiling.name();
  return s + (w.rounding() == Rounding::Stochastic ? "-sr" : "-rn");
}

Precision Precision::parse(const std::string& spec, Rounding rounding) {
  auto fail = [&](const std::string& why) -> Precision {
    throw std::invalid_argument("format '" + spec + "': " + why +
                                "; use fp32, int8, int16, intB (B = 2..16) or wXaYeZgV, e.g. w8a8e8g8");
  };
  if (spec == "fp32") return Precision{};
  if (const auto plus = spec.find('+'); plus != std::string::npos) {  // a name() with outlier tiling
    Precision p = parse(spec.substr(0, plus), rounding);
    p.tiling = OutlierTiling::parse_name(spec.substr(plus + 1));
    return p;
  }
  std::smatch m;
  auto fixed = [&](const std::string& bits) {
    const int b = std::stoi(bits);
    if (b < 2 || b > 16) fail("bit width " + bits + " is out of range 2..16");
    return Format::fixed(b, rounding);
  };
  if (std::regex_match(spec, m, std::regex(R"(int(\d{1,2}))"))) {
    const Format f = fixed(m[1]);
    return Precision{f, f, f, f, {}};
  }
  if (std::regex_match(spec, m, std::regex(R"(w(\d{1,2})a(\d{1,2})e(\d{1,2})g(\d{1,2}))"))) {
    return Precision{fixed(m[1]), fixed(m[2]), fixed(m[3]), fixed(m[4]), {}};
  }
  return fail("not a known spelling");
}

}  // namespace intrain
