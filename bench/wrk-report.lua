-- wrk script used by the herd benchmarks: prints one machine-readable line at the end,
--   WRKJSON {"requests":..,"duration_us":..,"connect":..,"read":..,"write":..,"status":..,
--            "timeout":..,"lat_p50_us":..,"lat_p99_us":..,...}
-- "status" is wrk's count of responses with an HTTP status > 399 (its "Non-2xx or 3xx").
-- The request itself is wrk's default (GET, the URL's path, the -H headers).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
