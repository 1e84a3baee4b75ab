"""amrg: AM-MRG radiology report generation."""
