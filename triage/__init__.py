"""triage: decides, study by study, which incoming DICOM studies a radiologist should label."""

__version__ = "0.1.0"
