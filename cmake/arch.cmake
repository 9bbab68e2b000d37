# Instruction-set selection for the kernels (KSAE_ARCH):
#   auto (default)  the highest of x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA) that the
#                   compiler accepts and the building CPU runs, else the compiler's default. A
#                   local build runs where it was built. See benchmarks/RESULTS.md: on an Intel
#                   Xeon v4 runs the encoder product 1.6x faster than v3; on AMD Zen 4 the two
#                   are equal; -march=native was slower than either on Zen 4.
#   portable        the compiler's default target: a binary for any CPU of the architecture.
#   native | x86-64-v2 | x86-64-v3 | x86-64-v4   exactly that -march.
include(CheckCXXCompilerFlag)

function(ksae_host_runs level result)
  set(src "${CMAKE_CURRENT_BINARY_DIR}/ksae_cpu_check_${level}.cpp")
  file(WRITE "${src}" "int main() { __builtin_cpu_init(); return __builtin_cpu_supports(\"${level}\") ? 0 : 1; }\n")
  try_run(run_rc compile_ok "${CMAKE_CURRENT_BINARY_DIR}/ksae_cpu_check_${level}" "${src}")
  if(compile_ok AND ("${run_rc}" STREQUAL "0"))
    set(${result} TRUE PARENT_SCOPE)
  else()
    set(${result} FALSE PARENT_SCOPE)
  endif()
endfunction()

function(ksae_arch_flags target arch)
  if(arch STREQUAL "auto")
    set(arch "portable")
    if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND NOT CMAKE_CROSSCOMPILING)
      foreach(level x86-64-v4 x86-64-v3)
        ksae_host_runs(${level} host_runs)
        if(host_runs)
          set(arch ${level})
          break()
        endif()
      endforeach()
    endif()
  endif()
  if(NOT arch STREQUAL "portable")
    if(arch STREQUAL "native")
      set(flag "-march=native")
    else()
      set(flag "-march=${arch}")
    endif()
    string(MAKE_C_IDENTIFIER "KSAE_HAS_${flag}" var)
    check_cxx_compiler_flag("${flag}" ${var})
    if(${var})
      target_compile_options(${target} PRIVATE ${flag})
      # Every CPU with AVX-512 has PREFETCHW, which the flag levels leave out (common.hpp's
      # prefetch_row_for_write).
      if(arch STREQUAL "x86-64-v4")
        target_compile_options(${target} PRIVATE -mprfchw)
      endif()
    else()
      message(WARNING "${flag} is not supported by this compiler: building portable")
      set(arch "portable")
    endif()
  endif()
  message(STATUS "ksae: instruction set ${arch}")
  target_compile_definitions(${target} PRIVATE KSAE_ARCH="${arch}")
endfunction()
