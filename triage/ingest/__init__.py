"""The ingest stage: from a file or a C-STORE to stored instances and complete studies.

- `receiver.py`: the DICOM C-ECHO / C-STORE receiver (pynetdicom), the network entry;
  `received.py`: what it and STOW-RS accept, durable before they answer.
- `watcher.py`: the inbox watcher; `ingestor.py`: one file at a time, journalled.
- `dicom.py`: reading and decoding an instance (`DecodedImage`, `ViewHeader`);
  `scope.py`: what the model is for; `phi.py`: patient identifiers kept out of logs.
- `preprocess.py`: decoded pixels to the model's input; `assembly.py`: instances to
  complete studies.
- `settings.py`: the `ingest:`, `scope:` and `dicom:` sections.

A stage: imports only the store, telemetry and errors (no other stage, no model).
"""
