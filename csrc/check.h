// LS_CHECK(cond, parts...): TORCH_CHECK with its message built without std::ostream.
//
// On the lent H200 image (Ubuntu 24.04, g++ 13.3, torch 2.11.0+cu130) every torch extension built
// there, even a minimal one, segfaults when TORCH_CHECK streams an integer into its message:
// std::ostream::_M_insert<long> reaches a codecvt vtable slot (native backtrace in
// benchmarks/results/gpu_h200/int_format_probe.log; probe in benchmarks/gpu/toolchain_probe/).
// Strings pass through that path safely, so the message is assembled here from std::to_string
// and string appends, and TORCH_CHECK receives one std::string, which c10::str hands on as is.
// The text is what c10's stream operators would print: [1, 2] for sizes, %g for floats.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace lenserve {
namespace check_detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "1" : "0"; }
inline void append(std::string& s, char v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename T, std::enable_if_t<std::is_enum_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(static_cast<std::underlying_type_t<T>>(v));
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void append(std::string& s, float v) { append(s, static_cast<double>(v)); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

}  // namespace check_detail

template <typename... Args>
std::string check_message(const Args&... args) {
  std::string s;
  (check_detail::append(s, args), ...);
  return s;
}

}  // namespace lenserve

#define LS_CHECK(cond, ...) TORCH_CHECK(cond, ::lenserve::check_message(__VA_ARGS__))
