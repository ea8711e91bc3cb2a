-- Argo CD resource health check for the branchmerge.dev kinds (TeacherGen, BranchSFT, Merge, Eval, MergeSearch).
--
-- Install it once per kind as `resource.customizations.health.branchmerge.dev_<Kind>` in argocd-cm
-- (docs/operations.md shows a command that reads this file). One script serves all five kinds because they
-- share the status contract written by the operator (operator/conditions.py):
--   Healthy      Ready=True and the status describes the current spec (observedGeneration == generation)
--   Degraded     Stalled=True or phase Failed (permanent failure, failed upstream)
--   Suspended    phase Suspended, or spec.resources.suspend set and the run not finished
--   Progressing  everything else: no status yet, an unobserved spec change, Pending/Waiting/Running
-- Argo CD runs this with gopher-lua (Lua 5.1): no goto, no integer division, no string.format("%d") on floats.

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function int_text(n)
  if n == nil then
    return "none"
  end
  return tostring(math.floor(n))
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
local suspend_requested = obj.spec ~= nil and obj.spec.resources ~= nil and obj.spec.resources.suspend == true

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the branchmerge operator to report a status"
  return hs
end

local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")

-- A status written for an older spec says nothing about the current one (Flux kstatus reads it the same way).
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. int_text(generation) ..
      " (observed " .. int_text(status.observedGeneration) .. ")"
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "Succeeded")
  return hs
end

if (stalled ~= nil and stalled.status == "True") or status.phase == "Failed" then
  hs.status = "Degraded"
  local reason = (stalled ~= nil and stalled.status == "True" and stalled.reason) or
      (ready ~= nil and ready.reason) or "Failed"
  hs.message = reason .. ": " .. message_of(stalled, message_of(ready, "the stage failed"))
  return hs
end

if status.phase == "Suspended" or (suspend_requested and status.phase ~= "Succeeded") then
  hs.status = "Suspended"
  hs.message = message_of(ready, "Suspended (spec.resources.suspend is true)")
  return hs
end

hs.status = "Progressing"
local text = status.phase
if ready ~= nil and ready.reason ~= nil and ready.reason ~= "" then
  text = text .. " (" .. ready.reason .. ")"
end
if status.progress ~= nil and status.progress.message ~= nil and status.progress.message ~= "" then
  text = text .. ": " .. status.progress.message
elseif ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  text = text .. ": " .. ready.message
end
hs.message = text
return hs
