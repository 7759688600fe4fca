"""DICOMweb (PS3.18) pieces the HTTP routes in :mod:`triage.api.dicomweb` are built from:
media types and multipart bodies, the DICOM JSON model, QIDO-RS queries, frames."""
