// SIMT emulator build: the CUDA header cuda_fp16.h resolves here (see ../simt.h).
#pragma once
#include "../simt.h"
