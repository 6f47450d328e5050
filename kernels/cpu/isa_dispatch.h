// Which instruction-set variant of a CPU kernel runs on this machine, decided at run time from the CPU (never from
// the build machine). Every kernel compiled once per variant (selective_scan_2d.cpp, channel_layer_norm.cpp; the
// variants and flags are vmamba_export/platforms.py's) dispatches through pick_isa(), so all of them agree on the
// variant and obey the same override. Only a kernel's dispatch unit (-DVMAMBA_SCAN_DISPATCH, with the platform's
// -DVMAMBA_SCAN_HAVE_* flags naming the variants linked beside it) includes this header.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(VMAMBA_SCAN_HAVE_ARMV8_2_A)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1UL << 10)  // arch/arm64/include/uapi/asm/hwcap.h
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

namespace vmamba {

enum class Isa { kBaseline, kX86_64_V3, kX86_64_V4, kArmV8_2_A };

// The names the variants are reported by and that VMAMBA_SCAN_ISA accepts.
inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kX86_64_V4: return "x86-64-v4";
    case Isa::kX86_64_V3: return "x86-64-v3";
    case Isa::kArmV8_2_A: return "armv8.2-a+fp16+dotprod";
    default: break;
  }
#if defined(__aarch64__)
  return "armv8-a";
#else
  return "generic";
#endif
}

// The widest variant this build holds and this CPU runs. The environment variable VMAMBA_SCAN_ISA (a name of
// isa_name) forces a lower one, for tests and benchmarks: a forced name only ever selects a variant the CPU
// supports, and an unknown name falls through to the baseline.
inline Isa pick_isa() {
  const char* forced = std::getenv("VMAMBA_SCAN_ISA");
  auto allowed = [forced](Isa isa) {
    return forced == nullptr || *forced == '\0' || std::strcmp(forced, isa_name(isa)) == 0;
  };
#if defined(VMAMBA_SCAN_HAVE_X86_64_V4) || defined(VMAMBA_SCAN_HAVE_X86_64_V3)
  __builtin_cpu_init();
#endif
#if defined(VMAMBA_SCAN_HAVE_X86_64_V4)
  if (__builtin_cpu_supports("x86-64-v4") && allowed(Isa::kX86_64_V4)) return Isa::kX86_64_V4;
#endif
#if defined(VMAMBA_SCAN_HAVE_X86_64_V3)
  if (__builtin_cpu_supports("x86-64-v3") && allowed(Isa::kX86_64_V3)) return Isa::kX86_64_V3;
#endif
#if defined(VMAMBA_SCAN_HAVE_ARMV8_2_A)
  // The kernel's CPU, not the build machine's: the Linux kernel reports the features in the aux vector.
  const unsigned long hwcap = getauxval(AT_HWCAP);
  if ((hwcap & HWCAP_ASIMDDP) && (hwcap & HWCAP_ASIMDHP) && allowed(Isa::kArmV8_2_A)) return Isa::kArmV8_2_A;
#endif
  (void)allowed;
  return Isa::kBaseline;
}

}  // namespace vmamba
