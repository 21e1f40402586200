// Sanitizer driver: runs every kernel path of the harness (harness.cu) once on small inputs with ties, under
// `compute-sanitizer --tool memcheck|racecheck`. Checks only what needs no reference (return codes, index order and
// range, counts); numerics are checked from Python (tokensieve.targets.tensorrt.kernel_harness). Exit 0 = all ran.
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

extern "C" {
int ts_device_count();
char const* ts_error_string(int err);
int ts_token_compact_host(void const*, int, void const*, int, int64_t, int64_t, int64_t, int64_t, int32_t, int, void*,
                          int32_t*, int32_t*);
int ts_diversity_select_host(void const*, int, float const*, int64_t, int64_t, int64_t, int64_t, int64_t, int, float,
                             int32_t*);
}

static int failures = 0;

static void check(bool ok, char const* what) {
    if (!ok) {
        std::printf("FAIL %s\n", what);
        ++failures;
    }
}

static float value(uint32_t i) {  // deterministic pseudo-random in [-1, 1)
    i = i * 2654435761u + 12345u;
    i ^= i >> 13;
    return static_cast<float>(i % 2000u) / 1000.f - 1.f;
}

static void compact(int64_t C, bool half, int maskBytes, int dynamic, int32_t minCount) {
    int64_t const B = 3, N = 33, K = 12;
    int const elem = half ? 2 : 4;
    std::vector<unsigned char> tokens(B * N * C * elem), out(B * K * C * elem);
    for (int64_t i = 0; i < B * N * C; ++i) {
        if (half) {
            __half h = __float2half(value(static_cast<uint32_t>(i)));
            std::memcpy(&tokens[i * 2], &h, 2);
        } else {
            float f = value(static_cast<uint32_t>(i));
            std::memcpy(&tokens[i * 4], &f, 4);
        }
    }
    std::vector<unsigned char> mask(B * N * maskBytes, 0);
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t n = 0; n < N; ++n) {
            bool keep = b == 0 ? true : b == 1 ? (n % 5 == 0) : false;  // more than K, fewer than K, none
            if (keep) mask[(b * N + n) * maskBytes] = 1;
        }
    }
    std::vector<int32_t> count(B, -1);
    int32_t size = -1;
    int const err = ts_token_compact_host(tokens.data(), elem, mask.data(), maskBytes, B, N, C, K, minCount, dynamic,
                                          out.data(), count.data(), &size);
    char what[160];
    std::snprintf(what, sizeof what, "token_compact C=%lld half=%d mask=%d dynamic=%d: %s", static_cast<long long>(C),
                  half, maskBytes, dynamic, ts_error_string(err));
    check(err == 0, what);
    check(count[0] == K && count[1] == 7 && count[2] == 0, "token_compact counts");
    if (dynamic) check(size == (minCount > K ? minCount : K), "token_compact size = max(max count, min_count)");
}

static void select(bool half, int mode) {
    int64_t const B = 2, N = 40, C = 24, K = 10, P = 1;
    std::vector<unsigned char> features(B * N * C * (half ? 2 : 4));
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t n = 0; n < N; ++n) {
            int64_t const src = n % 13 == 7 ? n - 1 : n;  // duplicated tokens: exact ties
            for (int64_t c = 0; c < C; ++c) {
                float f = value(static_cast<uint32_t>((b * N + src) * C + c));
                int64_t const i = (b * N + n) * C + c;
                if (half) {
                    __half h = __float2half(f);
                    std::memcpy(&features[i * 2], &h, 2);
                } else {
                    std::memcpy(&features[i * 4], &f, 4);
                }
            }
        }
    }
    std::vector<float> importance(B * N);
    for (int64_t i = 0; i < B * N; ++i) importance[i] = i % 3 == 0 ? 0.5f : (value(static_cast<uint32_t>(i + 7)) + 1) / 2;
    std::vector<int32_t> idx(B * K, -1);
    int const err = ts_diversity_select_host(features.data(), half, mode == 1 ? importance.data() : nullptr, B, N, C, K,
                                             P, mode, 0.6f, idx.data());
    char what[128];
    std::snprintf(what, sizeof what, "diversity_select half=%d mode=%d: %s", half, mode, ts_error_string(err));
    check(err == 0, what);
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t k = 0; k < K; ++k) {
            int32_t const v = idx[b * K + k];
            bool const ok = v >= P && v < N && (k == 0 || v > idx[b * K + k - 1]);
            check(ok, "diversity_select indices ascending in [P, N)");
            if (!ok) return;
        }
    }
}

int main() {
    if (ts_device_count() < 1) {
        std::printf("NO DEVICE: no CUDA device is visible (or the driver is too old)\n");
        return 2;
    }
    for (int dynamic = 0; dynamic < 2; ++dynamic) {
        compact(8, false, 4, dynamic, 0);   // 32-byte rows: uint4 copies
        compact(5, false, 1, dynamic, 0);   // 20-byte rows: uint32 copies
        compact(5, true, 1, dynamic, 10);   // 10-byte rows: uint16 copies; min_count below the largest count
    }
    for (int mode = 0; mode < 2; ++mode) {
        select(false, mode);
        select(true, mode);
    }
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
    return failures ? 1 : 0;
}
