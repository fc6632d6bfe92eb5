// SPDX-License-Identifier: Apache-2.0
//
// JSON for the Orbax reader: zarr metadata (.zarray, zarr.json) and Orbax's own
// files (_METADATA, _CHECKPOINT_METADATA), parsed with nlohmann_json under a
// nesting limit (a hostile file cannot exhaust the stack or memory through depth),
// every parse error an io_error naming the file. Small typed accessors keep the
// callers' error messages uniform: "<file>: field 'shape' must be an array".
#ifndef LINEN_IO_DETAIL_ORBAX_JSON_HPP
#define LINEN_IO_DETAIL_ORBAX_JSON_HPP

#include <cstddef>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "../../../errors.hpp"

namespace linen::io::detail {

struct orbax_json_too_deep {};

// The JSON document of n bytes at data; io_error (naming `what`) if it is not
// valid JSON or nests deeper than max_depth.
inline nlohmann::json parse_json_bounded(const std::uint8_t* data, std::size_t n, const std::string& what,
                                         int max_depth = 32) {
  int depth = 0;
  nlohmann::json::parser_callback_t cb = [&](int, nlohmann::json::parse_event_t ev, nlohmann::json&) {
    using E = nlohmann::json::parse_event_t;
    if (ev == E::object_start || ev == E::array_start) {
      if (++depth > max_depth) throw orbax_json_too_deep{};
    } else if (ev == E::object_end || ev == E::array_end) {
      --depth;
    }
    return true;
  };
  try {
    const char* p = reinterpret_cast<const char*>(data);
    return nlohmann::json::parse(p, p + n, cb);
  } catch (const orbax_json_too_deep&) {
    throw io_error(what + ": JSON nests deeper than " + std::to_string(max_depth) + " levels");
  } catch (const nlohmann::json::exception& e) {
    throw io_error(what + ": invalid JSON (" + e.what() + ")");
  }
}

inline const nlohmann::json& json_field(const nlohmann::json& j, const char* key, const std::string& what) {
  if (!j.is_object()) throw io_error(what + ": expected a JSON object, got " + std::string(j.type_name()));
  auto it = j.find(key);
  if (it == j.end()) throw io_error(what + ": missing field '" + key + "'");
  return *it;
}

inline std::string json_string(const nlohmann::json& j, const std::string& what) {
  if (!j.is_string()) throw io_error(what + " must be a string, got " + std::string(j.type_name()));
  return j.get<std::string>();
}

// A non-negative integer no larger than max.
inline std::int64_t json_count(const nlohmann::json& j, const std::string& what,
                               std::int64_t max = std::numeric_limits<std::int64_t>::max()) {
  if (j.is_number_unsigned()) {
    const auto v = j.get<std::uint64_t>();
    if (v <= static_cast<std::uint64_t>(max)) return static_cast<std::int64_t>(v);
  } else if (j.is_number_integer()) {
    const auto v = j.get<std::int64_t>();
    if (v >= 0 && v <= max) return v;
  }
  throw io_error(what + " must be an integer in [0, " + std::to_string(max) + "], got " + j.dump());
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_JSON_HPP
