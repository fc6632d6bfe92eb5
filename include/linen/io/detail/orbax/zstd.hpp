// SPDX-License-Identifier: Apache-2.0
//
// zstd for the Orbax reader and writer, through libzstd when linen::io was built
// with it (LINEN_HAS_ZSTD=1, cmake/linenFindZstd.cmake). Without it, this header
// still compiles and every call throws linen::io_error saying that zstd support is
// not built in.
//
// Decompression never produces more than a caller-given bound (the byte size that
// the array's chunk shape or the OCDBT config allows): a frame that declares a
// larger content size is refused before anything is allocated, and a frame without
// a declared size (tensorstore writes zarr v2 chunks and OCDBT nodes as streamed
// frames, with no content size in the header: a surprise) is decoded in steps into
// a buffer of at most bound + 1 bytes, and refused as soon as it passes the bound.
// Concatenated frames are accepted (a stream is a sequence of frames); trailing
// garbage or a truncated frame is an error.
#ifndef LINEN_IO_DETAIL_ORBAX_ZSTD_HPP
#define LINEN_IO_DETAIL_ORBAX_ZSTD_HPP

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../../../errors.hpp"

#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD
#include <zstd.h>
#endif

namespace linen::io::detail {

#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD
inline constexpr bool kHasZstd = true;
#else
inline constexpr bool kHasZstd = false;
#endif

inline const char* zstd_missing_message() {
  return "zstd support is not built in: linen::io was configured without libzstd "
         "(install libzstd-dev and reconfigure; Orbax checkpoints are zstd-compressed)";
}

inline void require_zstd(const std::string& what) {
  if (!kHasZstd) throw io_error(what + ": " + zstd_missing_message());
}

// The bytes that the zstd frames at src decode to, at most max_bytes of them.
inline std::vector<std::uint8_t> zstd_decompress(const std::uint8_t* src, std::size_t n, std::size_t max_bytes,
                                                 const std::string& what) {
  require_zstd(what);
#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD
  if (n == 0) throw io_error(what + ": empty zstd stream");
  const unsigned long long declared = ZSTD_getFrameContentSize(src, n);
  if (declared == ZSTD_CONTENTSIZE_ERROR) throw io_error(what + ": not a zstd frame");
  if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared > max_bytes)
    throw io_error(what + ": zstd frame declares " + std::to_string(declared) + " bytes, more than the " +
                   std::to_string(max_bytes) + " bytes it may hold");
  std::unique_ptr<ZSTD_DStream, decltype(&ZSTD_freeDStream)> ds(ZSTD_createDStream(), &ZSTD_freeDStream);
  if (!ds) throw io_error(what + ": cannot allocate a zstd decoder");
  // A window larger than the output bound is never needed: refusing it bounds the
  // decoder's own memory too (2^27 = 128 MiB or the bound, whichever is larger).
  int wlog = 10;
  while (wlog < 31 && (std::size_t{1} << wlog) < max_bytes) ++wlog;
  if (wlog < 27) wlog = 27;
  ZSTD_DCtx_setParameter(ds.get(), ZSTD_d_windowLogMax, wlog);
  std::vector<std::uint8_t> out;
  const std::size_t cap = max_bytes == static_cast<std::size_t>(-1) ? max_bytes : max_bytes + 1;
  std::size_t reserve = declared != ZSTD_CONTENTSIZE_UNKNOWN ? static_cast<std::size_t>(declared) : (n * 4);
  if (reserve > cap) reserve = cap;
  out.resize(reserve < 64 ? 64 : reserve);
  ZSTD_inBuffer in{src, n, 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  std::size_t ret = 1;
  while (true) {
    ret = ZSTD_decompressStream(ds.get(), &ob, &in);
    if (ZSTD_isError(ret)) throw io_error(what + ": corrupt zstd data (" + ZSTD_getErrorName(ret) + ")");
    if (ob.pos > max_bytes)
      throw io_error(what + ": zstd data decompresses past the " + std::to_string(max_bytes) +
                     " bytes it may hold (a decompression bomb or a wrong shape)");
    if (in.pos == in.size && ret == 0) break;  // every frame complete, all input used
    if (ob.pos == ob.size) {
      if (out.size() >= cap)
        throw io_error(what + ": zstd data decompresses past the " + std::to_string(max_bytes) +
                       " bytes it may hold (a decompression bomb or a wrong shape)");
      std::size_t grow = out.size() * 2;
      if (grow > cap || grow < out.size()) grow = cap;
      out.resize(grow);
      ob.dst = out.data();
      ob.size = out.size();
      continue;
    }
    if (in.pos == in.size) throw io_error(what + ": truncated zstd frame");
  }
  out.resize(ob.pos);
  return out;
#else
  (void)src, (void)n, (void)max_bytes;
  return {};
#endif
}

// One zstd frame (with its content size) holding the n bytes at src.
inline std::vector<std::uint8_t> zstd_compress(const std::uint8_t* src, std::size_t n, int level,
                                               const std::string& what) {
  require_zstd(what);
#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD
  std::vector<std::uint8_t> out(ZSTD_compressBound(n));
  const std::size_t r = ZSTD_compress(out.data(), out.size(), src, n, level);
  if (ZSTD_isError(r)) throw io_error(what + ": zstd compression failed (" + ZSTD_getErrorName(r) + ")");
  out.resize(r);
  return out;
#else
  (void)src, (void)n, (void)level;
  return {};
#endif
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_ZSTD_HPP
