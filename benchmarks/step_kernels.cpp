// The training step's kernels in a C++ loop, without Python: where a step's time goes when
// each kernel finds the caches as the others left them.
//
// Runs what SparseAutoencoder.partial_fit runs for a plain TopK (relu) model with linear-output
// MSE and Adam: the fused encode, decode_mse (decode by latent group on several threads, and
// the loss) and the backward with Adam fused in, over 8 different random batches in turn.
// With --separate it runs decode_sparse (decode by rows) and the loss gradient in a plain
// loop in place of decode_mse. Like the model's
// default (normalize_decoder=True), the backward projects the decoder gradient and Adam keeps
// W_dec's rows at unit norm; --free-decoder turns both off. Prints the medians of each phase
// and of the whole step after a fifth of the steps as warm-up.
//
// Build from the repository root with the package's instruction set (x86-64-v4 where the CPU
// has AVX-512, else x86-64-v3; any Eigen 3.4 include directory will do, and cmeel-eigen, the
// build requirement, installs one). -march=native times differently: with GCC 12's znver4
// tuning Eigen's product of (256 x 784) x (784 x 1000) took 4.7-5.2 ms on one Zen 4 thread,
// against 3.75-4.0 ms with x86-64-v4 (which the package builds with -mprfchw).
//     EIGEN=$(python -m cmeel cmake)/include/eigen3
//     FLAGS="-std=c++17 -O3 -march=x86-64-v4 -mprfchw -DNDEBUG -DEIGEN_DONT_PARALLELIZE -fno-math-errno"
//     g++ $FLAGS -DKSAE_HAVE_OPENMP -fopenmp -Icpp -I"$EIGEN" benchmarks/step_kernels.cpp -o step_kernels
// Run:
//     OMP_NUM_THREADS=2 ./step_kernels 1024 768 16384 32 --steps 50 --threads 2
// To compare two versions of the kernels, build this file against each checkout's cpp/ and
// alternate the two binaries.
//
// The last line gives the round trip of a cache line between the first two threads, before
// and after the steps (`step_kernels --round-trip` prints it alone, to label another run).
// On the 2-vCPU VM of RESULTS.md it is either about 55 ns (the two vCPUs on cores that share
// an L3) or about 320 ns (on different CCDs), and the host moves them between the two every
// few seconds; the (256, 784, 1000, 25) step took 3.6 and 7.2 ms in the two before the
// backward kept each latent's rows on one core. Compare runs with the same round trips.
#include "ksae/backward.hpp"
#include "ksae/diagnostics.hpp"
#include "ksae/encode.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using ksae::Index;
using Buffer = std::vector<float, Eigen::aligned_allocator<float>>;  // 16-byte aligned at least

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median_ms(std::vector<double> samples) {
  if (samples.empty()) return 0.0;
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2] * 1e3;
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr, "step_kernels: %s\nusage: step_kernels BATCH D_IN N_LATENTS K "
               "[--steps N] [--threads T] [--separate] [--free-decoder]\n"
               "       step_kernels --round-trip   (the round trip alone, to label other runs)\n",
               why);
  std::exit(2);
}

Index positive(const char* text, const char* name) {
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || value < 1) {
    usage((std::string(name) + ": expected a positive integer, got '" + text + "'").c_str());
  }
  return static_cast<Index>(value);
}

// Median round trip, in ns, of a cache line passed back and forth between threads 0 and 1
// (0 with fewer than two threads): ksae.thread_round_trip_ns, as the package measures it.
double round_trip_ns(int threads) {
  return threads >= 2 ? ksae::thread_round_trip_ns(2000, 5) : 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--round-trip") == 0) {
    std::printf("round trip between threads 0 and 1: %.0f ns\n", round_trip_ns(2));
    return 0;
  }
  if (argc < 5) usage("expected the shape");
  const Index batch = positive(argv[1], "BATCH"), d = positive(argv[2], "D_IN");
  const Index n = positive(argv[3], "N_LATENTS"), k = positive(argv[4], "K");
  if (k > n) usage("K: expected at most N_LATENTS");
  Index steps = 200;
  int threads = 0;
  bool separate = false, normalize_decoder = true;
  for (int i = 5; i < argc; ++i) {
    if (std::strcmp(argv[i], "--separate") == 0) {
      separate = true;
    } else if (std::strcmp(argv[i], "--free-decoder") == 0) {
      normalize_decoder = false;
    } else if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
      steps = positive(argv[++i], "--steps");
    } else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = static_cast<int>(positive(argv[++i], "--threads"));
    } else {
      usage((std::string("unknown argument '") + argv[i] + "'").c_str());
    }
  }

  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Buffer> batches(8, Buffer(static_cast<size_t>(batch * d)));
  for (auto& X : batches) {
    for (auto& x : X) x = normal(rng);
  }
  // The model's default initialisation in spirit: W_dec = W_enc, small random weights.
  Buffer W_enc_t(static_cast<size_t>(n * d)), W_dec(static_cast<size_t>(n * d));
  Buffer b_enc(static_cast<size_t>(n), 0.0f), b_dec(static_cast<size_t>(d), 0.0f);
  for (auto& w : W_enc_t) w = normal(rng) / std::sqrt(float(d));
  W_dec = W_enc_t;
  const size_t sizes[4] = {size_t(n * d), size_t(n), size_t(n * d), size_t(d)};
  Buffer m[4], v[4];
  for (int i = 0; i < 4; ++i) {
    m[i].assign(sizes[i], 0.0f);
    v[i].assign(sizes[i], 0.0f);
  }
  Buffer centered(static_cast<size_t>(batch * d)), grad_out(static_cast<size_t>(batch * d));
  Buffer values(static_cast<size_t>(batch * k));
  Buffer grad_b_enc(static_cast<size_t>(n)), grad_b_dec(static_cast<size_t>(d));
  std::vector<ksae::LatentIndex> indices(static_cast<size_t>(batch * k));

  const double trip_before = round_trip_ns(threads);
  std::vector<double> t_step, t_encode, t_decode, t_backward;
  double loss = 0.0;
  for (Index s = 0; s < steps; ++s) {
    const float* X = batches[static_cast<size_t>(s % 8)].data();
    const double t0 = now();
    ksae::encode_topk<float>(X, batch, d, W_enc_t.data(), b_enc.data(), b_dec.data(), n, k,
                             ksae::Activation::relu, threads, centered.data(), nullptr,
                             values.data(), indices.data());
    const double t1 = now();
    if (separate) {
      ksae::decode_sparse<float>(values.data(), indices.data(), batch, k, W_dec.data(),
                                 b_dec.data(), d, n, threads, grad_out.data());
      const float scale = float(2.0 / (double(batch) * double(d)));
      double sum = 0.0;
      for (Index i = 0; i < batch * d; ++i) {
        const float diff = grad_out[i] - X[i];
        sum += double(diff) * diff;
        grad_out[i] = diff * scale;
      }
      loss = sum / (double(batch) * double(d));
    } else {
      loss = ksae::decode_mse<float>(values.data(), indices.data(), batch, k, W_dec.data(),
                                     b_dec.data(), X, d, n, threads, grad_out.data());
    }
    const double t2 = now();
    const ksae::AdamSettings settings{1e-3, 0.9, 0.999, 1e-8, 0.0, static_cast<long long>(s + 1)};
    const ksae::FusedAdam<float> adam{
        W_enc_t.data(), b_enc.data(), W_dec.data(), b_dec.data(),
        {m[0].data(), m[1].data(), m[2].data(), m[3].data()},
        {v[0].data(), v[1].data(), v[2].data(), v[3].data()},
        ksae::AdamCoefficients<float>(settings), normalize_decoder};
    ksae::backward_topk<float>(grad_out.data(), centered.data(), values.data(), indices.data(),
                               batch, k, W_enc_t.data(), W_dec.data(), n, d, d,
                               ksae::Activation::relu, normalize_decoder, threads, nullptr,
                               grad_b_enc.data(), nullptr, grad_b_dec.data(), false, nullptr,
                               nullptr, nullptr, &adam);
    const double t3 = now();
    if (s >= steps / 5) {
      t_encode.push_back(t1 - t0);
      t_decode.push_back(t2 - t1);
      t_backward.push_back(t3 - t2);
      t_step.push_back(t3 - t0);
    }
  }
  std::printf("shape (%td, %td, %td, %td), %s, %s, %td steps (medians of the last %zu), last "
              "loss %.6f\n", batch, d, n, k, separate ? "separate decode and loss" : "decode_mse",
              normalize_decoder ? "unit-norm decoder" : "free decoder", steps, t_step.size(), loss);
  std::printf("step %.3f ms | encode %.3f | %s %.3f | backward_adam %.3f\n", median_ms(t_step),
              median_ms(t_encode), separate ? "decode+loss" : "decode_mse", median_ms(t_decode),
              median_ms(t_backward));
  if (threads >= 2) {
    std::printf("round trip between threads 0 and 1: %.0f ns before, %.0f ns after\n",
                trip_before, round_trip_ns(threads));
  }
  return 0;
}
