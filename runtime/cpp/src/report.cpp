// Latency statistics, top-k, and the JSON report.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "tokensieve/json.h"
#include "tokensieve/runtime.h"

namespace tokensieve {

namespace {

double percentile(const std::vector<double>& sorted, double p) {
    if (sorted.empty()) return 0;
    double pos = p / 100.0 * static_cast<double>(sorted.size() - 1);
    size_t lo = static_cast<size_t>(std::floor(pos));
    size_t hi = std::min(lo + 1, sorted.size() - 1);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

std::string num(double v) {
    if (!std::isfinite(v)) return "null";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    return buf;
}

std::string dims(const std::vector<int64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

}  // namespace

LatencyStats summarize_latencies(std::vector<double> ms) {
    LatencyStats s;
    s.count = ms.size();
    if (ms.empty()) return s;
    std::sort(ms.begin(), ms.end());
    s.mean = std::accumulate(ms.begin(), ms.end(), 0.0) / static_cast<double>(ms.size());
    s.median = percentile(ms, 50);
    s.p90 = percentile(ms, 90);
    s.p99 = percentile(ms, 99);
    s.min = ms.front();
    s.max = ms.back();
    return s;
}

std::vector<TopEntry> top_k(const std::vector<double>& values, size_t k) {
    std::vector<int64_t> idx(values.size());
    std::iota(idx.begin(), idx.end(), 0);
    k = std::min(k, idx.size());
    // NaN sorts last so it never hides a real maximum.
    auto better = [&](int64_t a, int64_t b) {
        double x = values[a], y = values[b];
        if (std::isnan(x) != std::isnan(y)) return std::isnan(y);
        if (x != y) return x > y;
        return a < b;
    };
    std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(), better);
    std::vector<TopEntry> out;
    for (size_t i = 0; i < k; ++i) out.push_back({idx[i], values[idx[i]]});
    return out;
}

std::string report_json(const Preflight& pf, const BenchmarkResult& r) {
    const auto& o = pf.options;
    const auto& l = r.latency;
    std::string s = "{\n";
    s += "  \"schema\": \"tokensieve.cpp-run/1\",\n";
    s += "  \"engine\": " + json::quote(o.engine_path) + ",\n";
    s += "  \"plugins\": " + (o.plugin_path.empty() ? std::string("null") : json::quote(o.plugin_path)) + ",\n";
    s += "  \"tensorrt_version\": " + json::quote(r.tensorrt_version) + ",\n";
    s += "  \"engine_tensorrt_version\": " + json::quote(pf.metadata.tensorrt_version) + ",\n";
    s += "  \"device\": {\"index\": " + std::to_string(r.device.index) + ", \"name\": " + json::quote(r.device.name) +
         ", \"compute_capability\": " + json::quote(r.device.compute_capability()) + "},\n";
    // The batch the run used (--batch, or the batch axis a --shape set; an engine without a dynamic batch axis: its
    // static one), which throughput_samples_per_s counts.
    s += "  \"batch\": " + std::to_string(pf.batch) + ",\n";
    // The options as given; the shape every input ran at is io_tensors[].shape.
    s += "  \"dims\": {";
    bool first = true;
    for (const auto& [name, v] : o.dims) {
        s += (first ? "" : ", ") + json::quote(name) + ": " + std::to_string(v);
        first = false;
    }
    s += "},\n  \"shapes\": {";
    first = true;
    for (const auto& [name, shape] : o.shapes) {
        s += (first ? "" : ", ") + json::quote(name) + ": " + dims(shape);
        first = false;
    }
    s += "},\n";
    s += "  \"warmup\": " + std::to_string(o.warmup) + ",\n";
    s += "  \"iters\": " + std::to_string(o.iters) + ",\n";
    s += "  \"latency_ms\": {\"mean\": " + num(l.mean) + ", \"median\": " + num(l.median) + ", \"p90\": " + num(l.p90) +
         ", \"p99\": " + num(l.p99) + ", \"min\": " + num(l.min) + ", \"max\": " + num(l.max) + "},\n";
    s += "  \"wall_seconds\": " + num(r.wall_seconds) + ",\n";
    s += "  \"throughput_samples_per_s\": " + num(r.throughput) + ",\n";
    s += "  \"device_memory_bytes\": " + std::to_string(r.device_memory_bytes) + ",\n";
    s += "  \"io_tensors\": [";
    for (size_t i = 0; i < r.bindings.size(); ++i) {
        const auto& b = r.bindings[i];
        s += std::string(i ? ", " : "") + "{\"name\": " + json::quote(b.name) + ", \"shape\": " + dims(b.shape) +
             ", \"dtype\": " + json::quote(b.dtype) + ", \"mode\": " + (b.is_input ? "\"input\"" : "\"output\"") + "}";
    }
    s += "],\n";
    s += "  \"first_output\": " + json::quote(r.first_output) + ",\n";
    s += "  \"top5\": [";
    for (size_t i = 0; i < r.top5.size(); ++i)
        s += std::string(i ? ", " : "") + "{\"index\": " + std::to_string(r.top5[i].index) + ", \"value\": " +
             num(r.top5[i].value) + "}";
    s += "]\n}\n";
    return s;
}

}  // namespace tokensieve
