#pragma once
// One include for Catch2 2.13 (CI, Debian 12) and Catch2 3.x (GPU machine).
// LibTorch's c10 logging defines a CHECK macro that aborts; include it first
// and drop it, so that whatever the include order, CHECK is Catch's.
#include <c10/util/Logging.h>
#undef CHECK
#if defined(PATCH_CATCH3)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#endif
