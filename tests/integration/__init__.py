"""Integration tests: real tritonserver processes serving model_repository/."""
