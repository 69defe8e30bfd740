# patch_add_module(NAME SOURCES ... [CUDA_SOURCES ...] DEPS ...)
# One static library per lib/ module, target patch_<NAME>, alias patch::<NAME>.
# CUDA sources are compiled only when PATCH_WITH_CUDA is on; the target then
# carries PATCH_WITH_CUDA=1 so the dispatch code can call the kernels.
function(patch_add_module name)
  cmake_parse_arguments(ARG "" "" "SOURCES;CUDA_SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  set(target patch_${name})
  set(srcs ${ARG_SOURCES})
  if(PATCH_WITH_CUDA)
    list(APPEND srcs ${ARG_CUDA_SOURCES})
  endif()
  add_library(${target} STATIC ${srcs})
  add_library(patch::${name} ALIAS ${target})
  target_include_directories(${target} PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/lib>)
  target_compile_features(${target} PUBLIC cxx_std_17)
  target_link_libraries(${target} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
  endif()
  if(PATCH_WITH_CUDA AND ARG_CUDA_SOURCES)
    target_compile_definitions(${target} PUBLIC PATCH_WITH_CUDA=1)
    set_target_properties(${target} PROPERTIES CUDA_SEPARABLE_COMPILATION OFF
                                               POSITION_INDEPENDENT_CODE ON)
  endif()
endfunction()

# patch_add_test(NAME SOURCES ... DEPS ...): a Catch2 executable whose test cases
# are registered with CTest one by one. FIXTURES names CTest fixtures (e.g. the
# oracle files that a Python script writes) that must be set up first.
function(patch_add_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;LABELS;FIXTURES" ${ARGN})
  add_executable(${name} ${ARG_SOURCES} ${PROJECT_SOURCE_DIR}/tests/test_main.cpp)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/tests)
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} patch_test_util ${PATCH_CATCH_TARGET})
  target_compile_definitions(${name} PRIVATE ${PATCH_CATCH_DEFINE})
  # A name the filter cannot match (a ";" in it) must fail, not pass empty:
  # Catch2 3 fails by default, 2.x with --warn NoTests (which 3.4 refuses).
  set(_extra "")
  if(Catch2_VERSION VERSION_LESS 3)
    set(_extra EXTRA_ARGS --warn NoTests)
  endif()
  catch_discover_tests(${name} TEST_PREFIX "${name}:" ${_extra})
  # catch_discover_tests splits list-valued PROPERTIES (ENVIRONMENT) apart, so
  # the properties are set by a second CTest include file, run after the one
  # that defines the discovered list ${name}_TESTS.
  # A test that lacks an optional asset (the SmolLM2-135M GGUF) prints
  # "SKIPPED: <why>" and CTest reports it as skipped, not passed.
  set(_props "ENVIRONMENT [==[${PATCH_TEST_ENV}]==] SKIP_REGULAR_EXPRESSION [==[SKIPPED:]==]")
  if(ARG_LABELS)
    string(APPEND _props " LABELS [==[${ARG_LABELS}]==]")
  endif()
  if(ARG_FIXTURES)
    string(APPEND _props " FIXTURES_REQUIRED [==[${ARG_FIXTURES}]==]")
  endif()
  set(_file "${CMAKE_CURRENT_BINARY_DIR}/${name}_properties.cmake")
  file(GENERATE OUTPUT "${_file}" CONTENT
    "if(${name}_TESTS)\n  set_tests_properties(\${${name}_TESTS} PROPERTIES ${_props})\nendif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${_file}")
endfunction()
