// Checksums of shard bytes, for the check that runs while the search streams a store.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ctrak {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as iSCSI / ext4 / google-crc32c:
// crc32c("123456789") == 0xE3069283. `crc` continues a previous value (0 to start).
uint32_t crc32c(const uint8_t* data, size_t n, uint32_t crc = 0);

// The shard checksum: CRC-32C of the little-endian uint32 CRC-32C values of consecutive
// `block`-byte blocks (the last one may be shorter). Independent blocks let three CRC streams
// run interleaved in one thread (the CRC instruction's latency is 3 cycles, its throughput 1).
uint32_t block_crc32c(const uint8_t* data, size_t n, size_t block);

// True when the SSE4.2 CRC instruction is used (else a slice-by-8 table).
bool crc32c_hardware();

}  // namespace ctrak
