// AMX tiles for raytp's CPU ops (linear_cpu.cpp, attention/paged_attention_cpu.cpp): the permission to use them and
// the tile configuration's layout. Included by both; cpu_ops.py hashes it with each source, so a change here
// rebuilds them.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace raytp_amx {

// Whether this process may use AMX tiles: Linux grants the tile state on request (arch_prctl), once per process.
inline bool granted() {
  static const bool ok = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ok;
}

// What _tile_loadconfig takes (palette 1): each tile's rows and bytes per row; a tile left at 0 is unused.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace raytp_amx
#endif
