"""DICOM networking: the C-ECHO / C-STORE receiver (:mod:`triage.dicomnet.receiver`)."""
