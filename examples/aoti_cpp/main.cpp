// Runs an AOTInductor package of a detector with ssd_post's postprocess, from
// C++ only: loads ssd_post's op library (the package calls ssd_post's ops, such as
// postprocess, or select_topk and batched_nms_padded for a per-level head, through
// the dispatcher but does not contain them), then the package, and prints
// the detections of a batch of images read from a raw float32 file.
//
//   ssd_post_aoti <package.pt2> <ssd_post op library> <images.f32> <B> <C> <H> <W>
//
// Output: one line "image <i> <n>" per image, then n lines
// "<label> <score> <x1> <y1> <x2> <y2> <anchor>" with round-trip float precision
// (anchor: the anchor row the detection came from, for gathering per-anchor data).
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

int usage(const char* program) {
  std::cerr << "usage: " << program
            << " <package.pt2> <ssd_post op library> <images.f32> <B> <C> <H> <W>\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) return usage(argv[0]);
  const std::string package = argv[1], library = argv[2], images_path = argv[3];
  std::vector<int64_t> shape;
  for (int i = 4; i < 8; ++i) {
    const long long value = std::atoll(argv[i]);
    if (value <= 0) return usage(argv[0]);
    shape.push_back(value);
  }

  // The op registrations run as the library's static initialisers.
  if (dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load the ssd_post op library " << library << ": " << dlerror() << "\n";
    return 1;
  }

  at::Tensor images = at::empty(shape, at::kFloat);
  std::ifstream file(images_path, std::ios::binary);
  file.read(reinterpret_cast<char*>(images.data_ptr<float>()),
            static_cast<std::streamsize>(images.numel() * sizeof(float)));
  if (!file || file.peek() != EOF) {
    std::cerr << images_path << " should hold exactly " << images.numel()
              << " float32 values (B*C*H*W)\n";
    return 1;
  }

  // AOTInductor checks input sizes, dtypes and devices only when asked; without
  // the check an image of another size runs and returns garbage.
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/1);
  try {
    torch::inductor::AOTIModelPackageLoader loader(package);
    const std::vector<at::Tensor> out = loader.run({images});
    // boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B],
    // anchor_indices [B, K]
    const at::Tensor boxes = out.at(0).contiguous(), scores = out.at(1).contiguous();
    const at::Tensor labels = out.at(2).to(at::kLong).contiguous();
    const at::Tensor counts = out.at(3).to(at::kLong).contiguous();
    const at::Tensor anchors = out.at(4).to(at::kLong).contiguous();
    for (int64_t b = 0; b < counts.size(0); ++b) {
      const int64_t n = counts.data_ptr<int64_t>()[b];
      std::printf("image %lld %lld\n", static_cast<long long>(b), static_cast<long long>(n));
      for (int64_t k = 0; k < n; ++k) {
        const float* box = boxes.data_ptr<float>() + (b * boxes.size(1) + k) * 4;
        const int64_t row = b * labels.size(1) + k;
        std::printf("%lld %.9g %.9g %.9g %.9g %.9g %lld\n",
                    static_cast<long long>(labels.data_ptr<int64_t>()[row]),
                    scores.data_ptr<float>()[row], box[0], box[1], box[2], box[3],
                    static_cast<long long>(anchors.data_ptr<int64_t>()[row]));
      }
    }
  } catch (const std::exception& error) {
    std::cerr << "running " << package << " failed: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
