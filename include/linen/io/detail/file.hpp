// SPDX-License-Identifier: Apache-2.0
//
// Checkpoint files opened safely (not part of the public API). A loader may be pointed
// at anything: a directory, a FIFO (which would block a plain open forever), a symlink
// to /dev/zero (which would read until memory runs out). input_file opens without
// blocking and refuses whatever is not a regular file, checking the file it has open
// (fstat), not the name (stat then open could race with a rename). Its size is known
// before anything is read, so no allocation depends on anything but it.
#ifndef LINEN_IO_DETAIL_FILE_HPP
#define LINEN_IO_DETAIL_FILE_HPP

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#define LINEN_IO_POSIX_FILES 1
#else
#include <filesystem>
#include <system_error>
#endif

#include "../../errors.hpp"

namespace linen::io::detail {

// A regular file open for reading at offsets; io_error names the file on any fault.
class input_file {
 public:
  explicit input_file(const std::string& file) : name_(file) {
#ifdef LINEN_IO_POSIX_FILES
    do {
      fd_ = ::open(file.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    } while (fd_ < 0 && errno == EINTR);
    if (fd_ < 0) throw io_error(file + ": cannot open for reading: " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int e = errno;
      ::close(fd_);
      throw io_error(file + ": cannot determine the file type: " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd_);
      throw io_error(file + ": not a regular file (" + kind_of(st.st_mode) + ")");
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
#else
    std::error_code ec;
    const auto status = std::filesystem::status(file, ec);
    if (ec || !std::filesystem::exists(status))
      throw io_error(file + ": cannot open for reading: " + (ec ? ec.message() : std::string("no such file")));
    if (!std::filesystem::is_regular_file(status)) throw io_error(file + ": not a regular file");
    in_.open(file, std::ios::binary);
    if (!in_) throw io_error(file + ": cannot open for reading: " + std::strerror(errno));
    size_ = static_cast<std::uint64_t>(std::filesystem::file_size(file, ec));
    if (ec) throw io_error(file + ": cannot determine the file size: " + ec.message());
#endif
    if (size_ > static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max()))
      throw io_error(file + ": file too large (" + std::to_string(size_) + " bytes)");
  }
  input_file(const input_file&) = delete;
  input_file& operator=(const input_file&) = delete;
  ~input_file() {
#ifdef LINEN_IO_POSIX_FILES
    ::close(fd_);
#endif
  }

  const std::string& name() const { return name_; }
  // The size when opened; a file that shrinks later gives an io_error on read.
  std::size_t size() const { return static_cast<std::size_t>(size_); }

  // Reads `n` bytes at `offset` into `dst`.
  void read_at(std::size_t offset, void* dst, std::size_t n) {
    auto* out = static_cast<char*>(dst);
#ifdef LINEN_IO_POSIX_FILES
    while (n > 0) {
      const std::size_t step = std::min<std::size_t>(n, std::size_t{1} << 30);
      const ssize_t got = ::pread(fd_, out, step, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0)
        throw io_error(name_ + ": cannot read " + std::to_string(n) + " bytes at byte " + std::to_string(offset) +
                       ": " + std::strerror(errno));
      if (got == 0)
        throw io_error(name_ + ": the file ended at byte " + std::to_string(offset) + " while reading it (it was " +
                       std::to_string(size_) + " bytes when opened: changed while being read?)");
      out += got;
      offset += static_cast<std::size_t>(got);
      n -= static_cast<std::size_t>(got);
    }
#else
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    if (n > 0 && !in_.read(out, static_cast<std::streamsize>(n)))
      throw io_error(name_ + ": cannot read " + std::to_string(n) + " bytes at byte " + std::to_string(offset));
#endif
  }

 private:
#ifdef LINEN_IO_POSIX_FILES
  static std::string kind_of(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISSOCK(m)) return "a socket";
    return "not a plain file";
  }
  int fd_ = -1;
#else
  std::ifstream in_;
#endif
  std::string name_;
  std::uint64_t size_ = 0;
};

// Reads a whole regular file; io_error names the file on failure.
inline std::vector<std::uint8_t> read_file_bytes(const std::string& file) {
  input_file in(file);
  std::vector<std::uint8_t> bytes(in.size());
  in.read_at(0, bytes.data(), bytes.size());
  return bytes;
}

// Writes `bytes` to `file`, replacing it; io_error names the file on failure.
inline void write_file_bytes(const std::string& file, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) throw io_error(file + ": cannot open for writing: " + std::strerror(errno));
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw io_error(file + ": write failed");
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_FILE_HPP
