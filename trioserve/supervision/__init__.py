"""The process side: model processes, their lifecycle, ports and output."""
