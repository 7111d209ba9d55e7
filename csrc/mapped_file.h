// Read-only memory map of a whole file: how the engines read feature shards without a copy.
//
// Reading a shard through read() costs a memcpy of every byte out of the page cache; a shared
// read-only mapping hands the engine the page-cache pages themselves. `populate` prefaults the
// whole file at construction (MAP_POPULATE after POSIX_FADV_WILLNEED): the constructor returns
// once every page is resident and mapped, so a reader thread that maps shard i + 1 while the
// engine scores shard i overlaps the disk reads (and the page-table work) with the compute.
// The mapping is PROT_READ and MAP_SHARED: nothing can write through it, and populating a
// shared mapping never copies a page (a private writable one would break copy-on-write).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ctrak {

class MappedFile {
 public:
  // Throws std::system_error (naming the file) when it cannot be opened or mapped.
  // sequential: MADV_SEQUENTIAL (aggressive kernel read-ahead, early reclaim behind the reader).
  MappedFile(const std::string& path, bool populate, bool sequential);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Start asynchronous read-ahead of [offset, offset + length) into the page cache (returns
  // without waiting for the disk). Clamped to the file.
  void will_need(size_t offset, size_t length) const;

 private:
  std::string path_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace ctrak
