-- wrk script for bench.py: walk the request cycle, tag each request with the
-- benchmark cell (nginx logs the tag, so one access log serves every cell),
-- check that every 2xx answer is a whole page, and print the figures as JSON.
--
--   wrk ... -s bench/mix.lua URL -- CELL PATH1 PATH2 ...

local threads = {}

function setup(thread)
   thread:set("number", #threads)
   table.insert(threads, thread)
end

function init(args)
   cell = args[1]
   paths = {}
   for i = 2, #args do
      paths[#paths + 1] = args[i]
   end
   -- Each thread starts at its own place in the cycle.
   position = (number * 7) % #paths
   non2xx, cut_off = 0, 0
end

function request()
   position = position % #paths + 1
   return wrk.format("GET", paths[position], {["X-Bench-Cell"] = cell})
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   elseif not string.find(body, "</html>", 1, true) then
      -- A worker that died mid-body can still leave nginx a 200 with too few
      -- bytes, a cut-off response that looks whole to a status count: only a
      -- whole page counts.
      cut_off = cut_off + 1
   end
end

function done(summary, latency, requests)
   local non2xx, cut_off = 0, 0
   for _, thread in ipairs(threads) do
      non2xx = non2xx + thread:get("non2xx")
      cut_off = cut_off + thread:get("cut_off")
   end
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
      '"non2xx": %d, "cut_off": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.max, non2xx, cut_off, e.connect, e.read, e.write, e.timeout))
end
