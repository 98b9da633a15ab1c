// The CPU per-level selection (select_per_level.cpp): what the schema file needs.
#pragma once

#include <string>

namespace ssd_post {
namespace cpu {

// How the CPU per-level selection scores its blocks in this process at the current
// thread count: "gathered" (only the pairs that may pass, with torch's sigmoid
// bits, the self-check passed) or "whole_block" (at::sigmoid of every block).
// Runs the self-check if it has not run yet for this thread count.
std::string per_level_scoring();

}  // namespace cpu
}  // namespace ssd_post
