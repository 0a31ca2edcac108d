# spec/fuzz.cmake -- libFuzzer targets for the file parsers (MOE_FUZZ=ON, clang only).
#   CC=clang cmake -S . -B build-fuzz -DMOE_FUZZ=ON -DMOE_CUDA=OFF && cmake --build build-fuzz
#   ./build-fuzz/fuzz_safetensors -max_total_time=60 spec/fuzz/corpus/st
#   ./build-fuzz/fuzz_npy -max_total_time=60 spec/fuzz/corpus/npy
# The engine's C sources (CPU backend only) are compiled into a static library with the
# sanitizers, so the fuzzers do not depend on the shared library's build options.
if(MOE_FUZZ)
  if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "MOE_FUZZ=ON needs clang: configure with CC=clang")
  endif()
  file(GLOB MOE_FUZZ_ENGINE_SOURCES CONFIGURE_DEPENDS
    ${CMAKE_SOURCE_DIR}/engine/src/*.c
    ${CMAKE_SOURCE_DIR}/engine/src/cpu/*.c)
  set(MOE_FUZZ_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=undefined
                     -fno-omit-frame-pointer -g)
  add_library(moe_fuzz_engine STATIC ${MOE_FUZZ_ENGINE_SOURCES})
  target_include_directories(moe_fuzz_engine PUBLIC ${CMAKE_SOURCE_DIR}/engine/include
                                             PRIVATE ${CMAKE_SOURCE_DIR}/engine/src)
  target_compile_definitions(moe_fuzz_engine PRIVATE MOE_BUILDING_LIB=1
    MOE_VERSION_STRING="${PROJECT_VERSION}"
    MOE_C_COMPILER_ID="${CMAKE_C_COMPILER_ID} ${CMAKE_C_COMPILER_VERSION}")
  target_compile_options(moe_fuzz_engine PRIVATE ${MOE_FUZZ_FLAGS} -fsanitize=fuzzer-no-link
                         -ffp-contract=off)
  foreach(target safetensors npy)
    add_executable(fuzz_${target} ${CMAKE_SOURCE_DIR}/spec/fuzz/fuzz_${target}.c)
    target_compile_options(fuzz_${target} PRIVATE ${MOE_FUZZ_FLAGS} -fsanitize=fuzzer)
    target_link_options(fuzz_${target} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_libraries(fuzz_${target} PRIVATE moe_fuzz_engine Threads::Threads ${CMAKE_DL_LIBS})
    if(MOE_LIBM)
      target_link_libraries(fuzz_${target} PRIVATE ${MOE_LIBM})
    endif()
  endforeach()
endif()
