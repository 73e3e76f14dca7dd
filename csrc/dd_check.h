// Error checks shared by the CPU and CUDA implementations of the dynadiag ops (csrc/cpu, csrc/cuda).
//
// Why not plain TORCH_CHECK(cond, "...", some_int64, ...): with arguments other than one C string, TORCH_CHECK
// formats the message through c10::str, i.e. a std::ostringstream built in *this* library, and streams each
// argument. On the H200 test machine (torch 2.11, docs/benchmarks/gpu/h200-quick-50365c8/gpu_check.log) the first
// failing check whose message streamed an int64_t crashed the process with a segfault inside the op, while a
// failing check whose message was only C strings and a ScalarType (printed through c10::toString, a const char*)
// raised normally. The difference between the two is std::ostream::operator<<(long), which goes through the
// stream's locale (the num_put facet) in libstdc++; string insertion does not touch the facet. Which library in
// that process left the facet unusable could not be established without the machine (scripts/gpu_check.sh now
// runs a probe that shows which message kinds crash there). DD_CHECK sidesteps the whole path: it formats
// numbers with std::to_chars (locale-free), concatenates one std::string and hands TORCH_CHECK a single C string,
// which c10 passes through without any stream (torchCheckMsgImpl(const char*, const char*)), exactly the path
// that worked on that machine.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdint>
#include <string>
#include <type_traits>

namespace dynadiag {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>>>
inline void append(std::string& s, I v) {
  char buf[24];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  s.append(buf, res.ptr);
}

// The message of a failed check: every part appended in order, numbers in decimal, no locale.
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace detail

// Number formatting for messages assembled elsewhere (same rules as DD_CHECK).
inline std::string num(int64_t v) { return detail::message(v); }

}  // namespace dynadiag

// TORCH_CHECK with a message built only when the check fails, from C strings, std::strings, integers and
// ScalarTypes, without any std::ostream.
#define DD_CHECK(cond, ...)                                                  \
  do {                                                                       \
    if (C10_UNLIKELY(!(cond))) {                                             \
      const std::string dd_check_msg_ = ::dynadiag::detail::message(__VA_ARGS__); \
      TORCH_CHECK(false, dd_check_msg_.c_str());                             \
    }                                                                        \
  } while (0)

// The same, raising ValueError in Python (TORCH_CHECK_VALUE): for bad argument values such as unsorted offsets.
#define DD_CHECK_VALUE(cond, ...)                                            \
  do {                                                                       \
    if (C10_UNLIKELY(!(cond))) {                                             \
      const std::string dd_check_msg_ = ::dynadiag::detail::message(__VA_ARGS__); \
      TORCH_CHECK_VALUE(false, dd_check_msg_.c_str());                       \
    }                                                                        \
  } while (0)

namespace dynadiag {

// Offsets must be strictly ascending (sorted, no repeats) and in [0, P): every kernel walks them in order (the
// CUDA apply kernels binary-search them and stage windows between the first and last offset of a chunk), so an
// unsorted list silently drops diagonals. One error (ValueError in Python) and message for every backend; the Python backends raise the same text
// (dynadiag.kernels.ops.check_offsets).
inline void check_offsets_host(const int64_t* off, int64_t K, int64_t P, const char* op) {
  for (int64_t k = 0; k < K; ++k) {
    DD_CHECK_VALUE(off[k] >= 0 && off[k] < P, op, ": offsets must be strictly ascending and in [0, ", P, "), got offsets[",
             k, "] = ", off[k]);
    DD_CHECK_VALUE(k == 0 || off[k] > off[k - 1], op, ": offsets must be strictly ascending and in [0, ", P,
             "), got offsets[", k - 1, "] = ", off[k - 1], " then offsets[", k, "] = ", off[k]);
  }
}

}  // namespace dynadiag
