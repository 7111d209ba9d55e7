#include "mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace ctrak {
namespace {

[[noreturn]] void fail(const std::string& what, const std::string& path, int err) {
  throw std::system_error(err, std::generic_category(), what + " " + path);
}

}  // namespace

MappedFile::MappedFile(const std::string& path, bool populate, bool sequential) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail("cannot stat", path, err);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ == 0) {  // mmap of length 0 fails; an empty file maps to nothing
    ::close(fd);
    return;
  }
  int flags = MAP_SHARED;
#ifdef MAP_POPULATE
  if (populate) {
    // Queue the whole file for read-ahead first: MAP_POPULATE alone faults page by page and
    // waits on each read-ahead window, while WILLNEED keeps the device's queue full.
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
    flags |= MAP_POPULATE;
  }
#endif
  void* p = ::mmap(nullptr, size_, PROT_READ, flags, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping keeps its own reference to the file
  if (p == MAP_FAILED) fail("cannot mmap", path, err);
  data_ = static_cast<uint8_t*>(p);
  if (sequential) ::madvise(data_, size_, MADV_SEQUENTIAL);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}

void MappedFile::will_need(size_t offset, size_t length) const {
  if (!data_ || offset >= size_) return;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t start = offset / page * page;
  const size_t end = length > size_ - offset ? size_ : offset + length;
  ::madvise(data_ + start, end - start, MADV_WILLNEED);
}

}  // namespace ctrak
