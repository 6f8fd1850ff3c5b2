"""Capacity planner for disaggregated DeepSeek-V3-architecture serving (``pdserve plan``).

Pure Python, no torch (except the CPU probe): a step simulator of one prefill and one
decode instance (``planner.simulator``) over a device table (``planner.hardware``), a
model's sizes (``planner.model_shape``), a load (``planner.workload``) and expert skew
(``planner.experts``); ``planner.plan`` enumerates layouts, keeps those that meet the
SLOs and picks the cheapest; ``planner.published`` checks the simulator against the
figures DeepSeek and SGLang published. docs/PLANNER.md has the model and its assumptions.
"""
