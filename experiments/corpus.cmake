# The training-text library (experiments/corpus.h): byte-level corpus, KJV
# loader and cache, train/validation split, deterministic batch sampler.
# Included from experiments/CMakeLists.txt; linked by the `intrain` executable
# and by tests/test_corpus.
add_library(intrain_corpus STATIC ${CMAKE_CURRENT_LIST_DIR}/corpus.cpp)
target_link_libraries(intrain_corpus PUBLIC intrain_core PRIVATE intrain_options)
