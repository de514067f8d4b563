"""What is specific to the QNN HTP: value-preserving graph forms it places (``htp_forms``) and context binaries."""
