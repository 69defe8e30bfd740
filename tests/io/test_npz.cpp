// The .npz reader and writer: round trips of every array kind mask files use,
// and one-line errors for damaged archives. numpy itself is the oracle of
// tests/maskfile/npz_interop.py (archives numpy writes, read here, and back).
#include <fstream>

#include "io/npz.h"
#include "io_test_util.h"

using namespace patch;

namespace {

std::string read_bytes(const std::string& path) { return core::read_file(path); }
void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Expects a one-line core::Error naming the file and containing `part`.
void require_bad_npz(const std::string& path, const std::string& part, const std::string& key = "") {
  const std::string msg = test::error_of([&] {
    io::NpzFile f(path);
    if (!key.empty()) (void)f.array(key);
  });
  INFO(msg);
  REQUIRE(msg.find(path) == 0);
  REQUIRE(msg.find(part) != std::string::npos);
  REQUIRE(msg.find('\n') == std::string::npos);
}

}  // namespace

TEST_CASE("npz files round-trip every array kind the mask formats use") {
  test::TempDir dir;
  const std::string path = dir.file("a.npz");
  std::string bits(1001, '\0');
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<char>((i * 37) & 0xFF);
  const std::string meta = "{\"base_model\": \"Größe 模型\", \"sparsity\": 0.45}";
  io::write_npz(path, {{"model.layers.0.mlp.down_proj.weight", io::npy_uint8({1001}, bits)},
                       {"model.layers.0.mlp.down_proj.weight.__shape__", io::npy_int64({77, 104})},
                       {"empty", io::npy_uint8({0}, "")},
                       {"__meta__", io::npy_unicode(meta)}});
  io::NpzFile f(path);
  REQUIRE(f.keys() == std::vector<std::string>{"model.layers.0.mlp.down_proj.weight",
                                               "model.layers.0.mlp.down_proj.weight.__shape__", "empty", "__meta__"});
  const auto a = f.array("model.layers.0.mlp.down_proj.weight");
  CHECK(a.descr == "|u1");
  CHECK(a.shape == std::vector<int64_t>{1001});
  CHECK(a.data == bits);
  CHECK(io::npy_integers(f.array("model.layers.0.mlp.down_proj.weight.__shape__"), "s") ==
        std::vector<int64_t>{77, 104});
  CHECK(f.array("empty").numel() == 0);
  const auto m = f.array("__meta__");
  CHECK(m.shape.empty());  // 0-d, as np.array(str) is
  CHECK(io::npy_text(m, "meta") == meta);
  // The same arrays give the same bytes (fixed timestamps).
  const std::string again = dir.file("b.npz");
  io::write_npz(again, {{"model.layers.0.mlp.down_proj.weight", io::npy_uint8({1001}, bits)},
                        {"model.layers.0.mlp.down_proj.weight.__shape__", io::npy_int64({77, 104})},
                        {"empty", io::npy_uint8({0}, "")},
                        {"__meta__", io::npy_unicode(meta)}});
  CHECK(read_bytes(path) == read_bytes(again));
}

TEST_CASE("npy headers: versions 1-3, shapes and dtypes") {
  io::NpyArray a{"<i4", {2, 3}, std::string(24, '\x01')};
  const std::string v1 = io::format_npy(a);
  CHECK(v1.size() % 64 == 24 % 64);  // header padded to 64 bytes, then the data
  const auto back = io::parse_npy(v1, "x");
  CHECK(back.descr == "<i4");
  CHECK(back.shape == std::vector<int64_t>{2, 3});
  CHECK(back.data == a.data);
  // Version 2.0: a 4-byte header length.
  const std::string header = "{'descr': '|b1', 'fortran_order': False, 'shape': (5,), }\n";
  std::string v2 = std::string("\x93NUMPY\x02\x00", 8);
  const uint32_t len = static_cast<uint32_t>(header.size());
  v2 += std::string(reinterpret_cast<const char*>(&len), 4) + header + std::string(5, '\x01');
  const auto b = io::parse_npy(v2, "y");
  CHECK(b.descr == "|b1");
  CHECK(b.numel() == 5);
  CHECK_THROWS_AS(io::parse_npy(v2.substr(0, v2.size() - 1), "y"), core::Error);  // data shorter than the shape
  CHECK(test::error_of([&] { io::parse_npy(io::format_npy({">i8", {1}, std::string(8, '\0')}), "z"); })
            .find("unsupported .npy dtype '>i8'") != std::string::npos);
  CHECK(test::error_of([&] { io::npy_integers(io::NpyArray{"<f4", {1}, std::string(4, '\0')}, "w"); })
            .find("expected an integer array") != std::string::npos);
}

TEST_CASE("damaged npz archives are one-line errors naming the file") {
  test::TempDir dir;
  const std::string good = dir.file("good.npz");
  io::write_npz(good, {{"k", io::npy_uint8({4000}, std::string(4000, 'x'))}});
  const std::string bytes = read_bytes(good);

  const std::string empty = dir.file("empty.npz");
  write_bytes(empty, "");
  require_bad_npz(empty, "not a zip archive");
  const std::string text = dir.file("text.npz");
  write_bytes(text, std::string(100, 'a'));
  require_bad_npz(text, "no end-of-central-directory record");
  // Cut in the middle of the member data: the central directory is gone.
  const std::string cut = dir.file("cut.npz");
  write_bytes(cut, bytes.substr(0, bytes.size() / 2));
  require_bad_npz(cut, "not a zip archive");
  // A flipped byte inside the deflated data: corrupt data or a CRC mismatch.
  const std::string flipped = dir.file("flipped.npz");
  std::string f = bytes;
  f[40] = static_cast<char>(f[40] ^ 0x55);
  write_bytes(flipped, f);
  const std::string msg = test::error_of([&] { (void)io::NpzFile(flipped).array("k"); });
  INFO(msg);
  CHECK((msg.find("corrupt deflate data") != std::string::npos || msg.find("CRC-32 mismatch") != std::string::npos));
  // An unknown compression method (bzip2 = 12) in the central directory.
  const std::string bz = dir.file("bz.npz");
  std::string b = bytes;
  const size_t central = b.find(std::string("PK\x01\x02", 4));
  b[central + 10] = 12;
  write_bytes(bz, b);
  require_bad_npz(bz, "compression method 12");
  // A member that is not an array.
  const std::string txt = dir.file("member.npz");
  std::string t = bytes;
  t[central + 46 + 1] = 'X';  // "k.npy" -> "kXnpy"
  write_bytes(txt, t);
  require_bad_npz(txt, "is not a .npy array");
  // A claimed size no deflate stream can reach.
  const std::string bomb = dir.file("bomb.npz");
  std::string z = bytes;
  z[central + 24 + 3] = 0x7F;  // uncompressed size ~2 GB from ~40 bytes
  write_bytes(bomb, z);
  require_bad_npz(bomb, "corrupt", "k");
}
