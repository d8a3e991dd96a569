-- The fence: an attempt (`job`, an arq job id `<stream id>.<n>`) may act on its stream only while
-- it is the stream's current attempt and the stream has not ended, so a worker presumed dead
-- cannot act after its successor or after the end (Kleppmann's fencing token). Returns the
-- metadata's values of `job`, `ended` and then `...` if it may, else nil.
local function if_current(meta, job, ...)
  local values = redis.call('HMGET', meta, 'job', 'ended', ...)
  if values[1] ~= job or values[2] then return nil end
  return values
end
