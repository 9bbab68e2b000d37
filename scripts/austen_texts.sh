#!/usr/bin/env bash
# Jane Austen's six novels as .txt files in DIR (one per novel, paragraphs separated by blank
# lines), from Debian's r-cran-janeaustenr (apt-get install r-cran-janeaustenr): offline
# English prose, about 730k words, for ksae harvest.
set -euo pipefail
dir=${1:?usage: scripts/austen_texts.sh DIR}
mkdir -p "$dir"
Rscript -e 'library(janeaustenr); args <- commandArgs(TRUE); b <- austen_books()
for (t in unique(as.character(b$book))) {
  writeLines(b$text[b$book == t], file.path(args[1], paste0(gsub("[^A-Za-z]+", "_", t), ".txt")))
}' "$dir"
ls "$dir"
