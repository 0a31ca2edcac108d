# Tests: one ctest entry per C test (spec/c/test_*.c) and per Busted spec file (spec/*_spec.lua).
# GPU specs (*_gpu_spec.lua) exit 77 without a CUDA device and are reported as Skipped.
find_program(MOE_LUAJIT luajit)
file(GLOB MOE_C_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/spec/c/test_*.c)
foreach(src ${MOE_C_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE moe)
  target_include_directories(${name} PRIVATE ${CMAKE_SOURCE_DIR}/engine/include ${CMAKE_SOURCE_DIR}/engine/src)
  target_compile_options(${name} PRIVATE -Wall -Wextra -Wno-unused-parameter)
  if(MOE_SANITIZE)
    target_compile_options(${name} PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer)
    target_link_options(${name} PRIVATE -fsanitize=address,undefined)
  endif()
  add_test(NAME c_${name} COMMAND ${name})
  set_tests_properties(c_${name} PROPERTIES SKIP_RETURN_CODE 77)
endforeach()

if(MOE_LUAJIT)
  set(MOE_TEST_ENV
    "MOE_LIB=$<TARGET_FILE:moe>"
    "MOE_CDEF=${MOE_CDEF}"
    "MOE_BUILD_DIR=${CMAKE_BINARY_DIR}"
    "MOE_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
  if(MOE_SANITIZE)
    # LuaJIT itself is not instrumented: preload the runtime and keep leak checks to C tests.
    execute_process(COMMAND ${CMAKE_C_COMPILER} -print-file-name=libasan.so
                    OUTPUT_VARIABLE MOE_ASAN_LIB OUTPUT_STRIP_TRAILING_WHITESPACE)
    execute_process(COMMAND ${CMAKE_C_COMPILER} -print-file-name=libubsan.so
                    OUTPUT_VARIABLE MOE_UBSAN_LIB OUTPUT_STRIP_TRAILING_WHITESPACE)
    list(APPEND MOE_TEST_ENV "LD_PRELOAD=${MOE_ASAN_LIB}:${MOE_UBSAN_LIB}"
      "ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1"
      "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1")
  endif()
  file(GLOB MOE_SPECS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/spec/*_spec.lua)
  foreach(spec ${MOE_SPECS})
    get_filename_component(name ${spec} NAME_WE)
    add_test(NAME ${name}
      COMMAND ${MOE_LUAJIT} ${CMAKE_SOURCE_DIR}/scripts/moe spec ${spec}
      WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
    set_tests_properties(${name} PROPERTIES ENVIRONMENT "${MOE_TEST_ENV}" SKIP_RETURN_CODE 77)
  endforeach()
  # One plain-LuaJIT smoke test outside Busted (Busted reloads modules between files).
  add_test(NAME lua_smoke COMMAND ${MOE_LUAJIT} ${CMAKE_SOURCE_DIR}/spec/smoke.lua
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(lua_smoke PROPERTIES ENVIRONMENT "${MOE_TEST_ENV}")
else()
  message(WARNING "luajit not found: Lua specs are not registered (apt-get install luajit lua-busted)")
endif()
