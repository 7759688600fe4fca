"""DICOMweb (PS3.18) pieces the HTTP routes in :mod:`triage.api.dicomweb_routes` are
built from: media types and multipart bodies, the DICOM JSON model, QIDO-RS queries,
frames.

A stage (the archive as DICOMweb sees it): imports only the store, telemetry and errors.
"""
