#include "io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace patch::io {

MappedFile::MappedFile(const std::string& p) : path(p) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw core::Error(core::str(path, ": cannot open (", std::strerror(errno), ")"));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw core::Error(core::str(path, ": not a regular file"));
  }
  size = static_cast<size_t>(st.st_size);
  if (size > 0) {
    void* p_map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p_map == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw core::Error(core::str(path, ": cannot memory-map (", std::strerror(err), ")"));
    }
    data = static_cast<uint8_t*>(p_map);
  }
  ::close(fd);  // the mapping stays valid without the descriptor
}

MappedFile::~MappedFile() {
  if (data) ::munmap(data, size);
}

at::Tensor view_mapped(const std::shared_ptr<MappedFile>& map, size_t offset,
                       const std::vector<int64_t>& shape, at::ScalarType dtype) {
  auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  uint8_t* ptr = map->data ? map->data + offset : nullptr;
  if (!ptr) return at::empty(shape, options);  // only zero-element tensors reach here
  auto keep = map;
  at::Tensor t = at::from_blob(
      ptr, shape, [keep](void*) mutable { keep.reset(); }, options);
  if (reinterpret_cast<uintptr_t>(ptr) % c10::elementSize(dtype) != 0) return t.clone();
  return t;
}

}  // namespace patch::io
