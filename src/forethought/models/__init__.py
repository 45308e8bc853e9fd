"""Learned dynamics models. Each turns into planner-ready functions with `as_dynamics(...)`."""
