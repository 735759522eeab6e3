"""Engine backends defined entirely under tests/, to prove a backend is one folder."""
