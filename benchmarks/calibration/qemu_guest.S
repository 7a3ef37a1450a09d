/* A bare-metal x86-64 guest that runs the benchmark access patterns as real
 * guest code under QEMU, with PKS enforced, for comparing QEMU's TCG with
 * pks_emu's replay of the same patterns (benchmarks/calibration/qemu_pks.py
 * builds it, boots it and times it; docs/benchmarks.md has the figures).
 *
 * QEMU loads it with -kernel as a Multiboot 1 image (an ELF32 file: this is
 * assembled as x86-64 code and converted with objcopy). The 32-bit entry
 * identity-maps the low 1 GiB with 2-MiB pages and enters long mode, 5-level
 * paging when the command line's argument (-append) is "5" (CR4.LA57 can only
 * be set before paging is on: SDM Vol. 3A 4.1.2).
 *
 * The test region, VA 0x40000000 + 1 GiB: 262,144 supervisor 4-KiB pages,
 * writable, NX, A and D already set, page i under protection key i % 16
 * (PTE bits 62:59, SDM Vol. 3A 4.6.2) and backed by one of 256 frames.
 * CR0.WP, CR4.PGE/SMEP/SMAP/PKE/PKS and EFER.NXE are on, as in the state of
 * pks_emu's bench cases. Every pattern is an array of 8-aligned addresses,
 * bit 0 set for a write, generated before its phase with xorshift64*:
 *
 *   'A'..'a'  TLB-resident: 256 pages, no register writes        50 x 1 M
 *   'B'..'b'  the same with WRMSR IA32_PKRS every 100 accesses    5 x 1 M
 *             (the value it already holds, as make_hit_trace)
 *   'C'..'c'  random order over all 262,144 pages (a permutation,  8 x 256 Ki
 *             8 passes)
 *   'D'..'d'  fault storm: 64 pages, PKRS access-disables keys    2 x 1 M
 *             3..15, so 13 of 16 pages fault; the #PF handler
 *             counts the fault and resumes after the 3-byte mov
 *
 * It first checks CPUID for PKU, PKS (and LA57) and prints "U" and leaves
 * without them, then prints "R<cr4>". Each phase is framed by its two letters on COM1, so the host times it by
 * when they arrive. At the end the guest prints "F<faults> E<expected>
 * N<other>" in hex (the storm's #PF count, the count its pattern implies,
 * and any fault that is not a PK fault of the storm, which must be 0) and
 * leaves through isa-debug-exit. Any other exception prints "X<vector>" and
 * leaves at once.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003

        .set PML5, 0x200000
        .set PML4, 0x201000
        .set PDPT, 0x202000
        .set PD_LOW, 0x203000
        .set PD_TEST, 0x204000
        .set PT_TEST, 0x400000          /* 512 page tables, 2 MiB */
        .set FRAMES, 0x800000           /* 256 frames the test pages share */
        .set TEST_VA, 0x40000000
        .set TEST_PAGES, 262144
        .set HIT_ARRAY, 0x1000000       /* 1,000,000 entries */
        .set HIT_N, 1000000
        .set RND_ARRAY, 0x1800000       /* 262,144 entries */
        .set STORM_ARRAY, 0x1A00000     /* 1,000,000 entries */
        .set COM1, 0x3F8
        .set MSR_EFER, 0xC0000080
        .set MSR_PKRS, 0x6E1

        .text
        .code32
        .globl _start
        .align 4
mb_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

_start:
        cli
        mov     $stack_top, %esp
        xor     %esi, %esi              /* 1: 5-level paging */
        testl   $4, (%ebx)              /* multiboot flags: cmdline present */
        jz      1f
        mov     16(%ebx), %eax          /* QEMU: "<kernel file> <-append>" */
0:      movb    (%eax), %cl
        test    %cl, %cl
        jz      1f
        inc     %eax
        cmp     $' ', %cl
        jne     0b
        cmpb    $'5', (%eax)
        jne     0b
        mov     $1, %esi
1:      mov     %esi, la57
        /* CPUID.(EAX=7,ECX=0):ECX: PKU bit 3, LA57 bit 16, PKS bit 31 */
        mov     $7, %eax
        xor     %ecx, %ecx
        cpuid
        mov     $0x80000008, %eax
        test    %esi, %esi
        jz      1f
        or      $0x10000, %eax
1:      and     %eax, %ecx
        cmp     %eax, %ecx
        je      1f
        mov     $'U', %al               /* unsupported: leave at once */
        mov     $COM1, %dx
        out     %al, %dx
        mov     $'\n', %al
        out     %al, %dx
        mov     $3, %eax
        mov     $0xF4, %dx
        out     %eax, %dx
        hlt
1:
        /* zero the paging structures below the test page tables */
        mov     $PML5, %edi
        mov     $(0x200000 / 4), %ecx
        xor     %eax, %eax
        rep stosl
        movl    $(PML4 | 3), PML5
        movl    $(PDPT | 3), PML4
        movl    $(PD_LOW | 3), PDPT
        /* the low 1 GiB, 2-MiB pages, key 0 */
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x83, %eax             /* P, R/W, PS */
        mov     %eax, PD_LOW(,%ecx,8)
        inc     %ecx
        cmp     $512, %ecx
        jb      2b
        mov     $0x20, %eax             /* CR4.PAE */
        test    %esi, %esi
        jz      3f
        or      $0x1000, %eax           /* CR4.LA57 */
3:      mov     %eax, %cr4
        mov     $PML4, %eax
        test    %esi, %esi
        jz      4f
        mov     $PML5, %eax
4:      mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $0x900, %eax            /* LME, NXE */
        wrmsr
        mov     %cr0, %eax
        or      $0x80010001, %eax       /* PG, WP, PE */
        mov     %eax, %cr0
        lgdt    gdtr
        ljmp    $0x08, $long_mode

        .code64
long_mode:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $stack_top, %rsp
        call    build_idt
        lidt    idtr
        call    build_test_tables
        mov     %cr4, %rax
        or      $((1 << 7) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 24)), %rax
        mov     %rax, %cr4              /* PGE, SMEP, SMAP, PKE, PKS */
        mov     %cr3, %rax
        mov     %rax, %cr3
        xor     %eax, %eax
        xor     %edx, %edx
        mov     $MSR_PKRS, %ecx
        wrmsr
        mov     $'R', %al               /* the CR4 it runs with */
        call    putc
        mov     %cr4, %rax
        call    puthex
        mov     $' ', %al
        call    putc
        xor     %r15, %r15              /* storm #PF count */
        movq    $0x9E3779B97F4A7C15, %r14       /* PRNG state */

        /* A and B: 256 pages */
        mov     $HIT_ARRAY, %rdi
        mov     $HIT_N, %rcx
        mov     $255, %r8
        call    fill_random
        mov     $'A', %al
        call    putc
        mov     $50, %r12
5:      mov     $HIT_ARRAY, %rbx
        mov     $HIT_N, %r13
        call    run_plain
        dec     %r12
        jnz     5b
        mov     $'a', %al
        call    putc

        mov     $'B', %al
        call    putc
        mov     $5, %r12
6:      mov     $HIT_ARRAY, %rbx
        mov     $(HIT_N / 100), %r13
        call    run_wrmsr
        dec     %r12
        jnz     6b
        mov     $'b', %al
        call    putc

        /* C: a permutation of all pages */
        call    fill_permutation
        mov     %cr3, %rax
        mov     %rax, %cr3
        mov     $'C', %al
        call    putc
        mov     $8, %r12
7:      mov     $RND_ARRAY, %rbx
        mov     $TEST_PAGES, %r13
        call    run_plain
        dec     %r12
        jnz     7b
        mov     $'c', %al
        call    putc

        /* D: the fault storm */
        mov     $STORM_ARRAY, %rdi
        mov     $HIT_N, %rcx
        mov     $63, %r8
        call    fill_random
        xor     %eax, %eax
        mov     $3, %ecx
8:      lea     (%ecx,%ecx), %edx
        bts     %edx, %eax              /* AD of key ecx */
        inc     %ecx
        cmp     $16, %ecx
        jb      8b
        xor     %edx, %edx
        mov     $MSR_PKRS, %ecx
        wrmsr
        mov     $1, %al
        mov     %al, storm_on
        mov     $'D', %al
        call    putc
        mov     $2, %r12
9:      mov     $STORM_ARRAY, %rbx
        mov     $HIT_N, %r13
        call    run_plain
        dec     %r12
        jnz     9b
        mov     $'d', %al
        call    putc
        movb    $0, storm_on

        /* the counts */
        mov     $'F', %al
        call    putc
        mov     %r15, %rax
        call    puthex
        mov     $' ', %al
        call    putc
        mov     $'E', %al
        call    putc
        call    storm_expected
        call    puthex
        mov     $' ', %al
        call    putc
        mov     $'N', %al
        call    putc
        mov     other_faults, %rax
        call    puthex
        mov     $'\n', %al
        call    putc
        xor     %eax, %eax
        jmp     exit_qemu

/* r13 accesses from the array at rbx (advanced) */
run_plain:
1:      mov     (%rbx), %rsi
        add     $8, %rbx
        btr     $0, %rsi
        jc      2f
        .byte   0x48, 0x8b, 0x06        /* mov (%rsi), %rax: 3 bytes */
        dec     %r13
        jnz     1b
        ret
2:      .byte   0x48, 0x89, 0x06        /* mov %rax, (%rsi): 3 bytes */
        dec     %r13
        jnz     1b
        ret

/* r13 groups: WRMSR IA32_PKRS (its own value), then 100 accesses */
run_wrmsr:
1:      xor     %eax, %eax
        xor     %edx, %edx
        mov     $MSR_PKRS, %ecx
        wrmsr
        mov     $100, %ecx
2:      mov     (%rbx), %rsi
        add     $8, %rbx
        btr     $0, %rsi
        jc      3f
        .byte   0x48, 0x8b, 0x06
        dec     %ecx
        jnz     2b
        jmp     4f
3:      .byte   0x48, 0x89, 0x06
        dec     %ecx
        jnz     2b
4:      dec     %r13
        jnz     1b
        ret

/* rax = the next xorshift64* number (state in r14) */
rand:
        mov     %r14, %rax
        shr     $12, %rax
        xor     %rax, %r14
        mov     %r14, %rax
        shl     $25, %rax
        xor     %rax, %r14
        mov     %r14, %rax
        shr     $27, %rax
        xor     %rax, %r14
        mov     %r14, %rax
        movq    $0x2545F4914F6CDD1D, %rdx
        imul    %rdx, %rax
        ret

/* rcx entries at rdi: TEST_VA + (page & r8) * 4096 + 8 * (0..511), bit 0 a write */
fill_random:
1:      call    rand
        mov     %rax, %rdx
        shr     $32, %rdx
        and     %r8, %rdx               /* page */
        shl     $12, %rdx
        mov     %rax, %r9
        shr     $20, %r9
        and     $511, %r9
        shl     $3, %r9                 /* offset */
        add     %r9, %rdx
        mov     %rax, %r9
        shr     $61, %r9
        and     $1, %r9                 /* write */
        or      %r9, %rdx
        mov     $TEST_VA, %r9
        add     %r9, %rdx
        mov     %rdx, (%rdi)
        add     $8, %rdi
        dec     %rcx
        jnz     1b
        ret

/* RND_ARRAY: the pages in a random order (Fisher-Yates), offsets and writes random */
fill_permutation:
        xor     %ecx, %ecx
1:      mov     %rcx, RND_ARRAY(,%rcx,8)
        inc     %ecx
        cmp     $TEST_PAGES, %ecx
        jb      1b
        mov     $(TEST_PAGES - 1), %rcx
2:      call    rand
        lea     1(%rcx), %r9
        mul     %r9                     /* rdx = j in 0..rcx */
        mov     RND_ARRAY(,%rcx,8), %r9
        mov     RND_ARRAY(,%rdx,8), %r10
        mov     %r10, RND_ARRAY(,%rcx,8)
        mov     %r9, RND_ARRAY(,%rdx,8)
        dec     %rcx
        jnz     2b
        xor     %ecx, %ecx
3:      call    rand
        mov     RND_ARRAY(,%rcx,8), %rdx
        shl     $12, %rdx
        mov     %rax, %r9
        shr     $20, %r9
        and     $511, %r9
        shl     $3, %r9
        add     %r9, %rdx
        shr     $61, %rax
        and     $1, %rax
        or      %rax, %rdx
        mov     $TEST_VA, %r9
        add     %r9, %rdx
        mov     %rdx, RND_ARRAY(,%rcx,8)
        inc     %ecx
        cmp     $TEST_PAGES, %ecx
        jb      3b
        ret

/* rax = the storm accesses whose page's key is 3..15, times its passes */
storm_expected:
        xor     %eax, %eax
        xor     %ecx, %ecx
1:      mov     STORM_ARRAY(,%rcx,8), %rdx
        shr     $12, %rdx
        and     $15, %edx
        cmp     $3, %edx
        jb      2f
        inc     %rax
2:      inc     %ecx
        cmp     $HIT_N, %ecx
        jb      1b
        shl     $1, %rax                /* 2 passes */
        ret

/* the test pages: PDPT[1] -> PD_TEST -> 512 page tables */
build_test_tables:
        movq    $(PD_TEST | 3), %rax
        mov     %rax, PDPT + 8
        xor     %ecx, %ecx
1:      mov     %rcx, %rax
        shl     $12, %rax
        add     $(PT_TEST | 3), %rax
        mov     %rax, PD_TEST(,%rcx,8)
        inc     %ecx
        cmp     $512, %ecx
        jb      1b
        xor     %ecx, %ecx
        movq    $0x8000000000000063, %r8        /* XD, D, A, R/W, P */
2:      mov     %rcx, %rax
        and     $255, %rax
        shl     $12, %rax
        add     $FRAMES, %rax
        or      %r8, %rax
        mov     %rcx, %rdx
        and     $15, %rdx
        shl     $59, %rdx                       /* the protection key */
        or      %rdx, %rax
        mov     %rax, PT_TEST(,%rcx,8)
        inc     %ecx
        cmp     $TEST_PAGES, %ecx
        jb      2b
        ret

/* 32 gates: #PF to pf_entry, the rest to their stubs */
build_idt:
        xor     %ecx, %ecx
1:      lea     bad_stubs(%rip), %rax
        imul    $16, %rcx, %rdx
        add     %rdx, %rax
        cmp     $14, %ecx
        jne     2f
        lea     pf_entry(%rip), %rax
2:      mov     %rcx, %rdx
        shl     $4, %rdx
        lea     idt(%rip), %rdi
        add     %rdx, %rdi
        mov     %ax, (%rdi)
        movw    $0x08, 2(%rdi)
        movw    $0x8E00, 4(%rdi)
        shr     $16, %rax
        mov     %ax, 6(%rdi)
        shr     $16, %rax
        mov     %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        inc     %ecx
        cmp     $32, %ecx
        jb      1b
        ret

/* A PK fault of the storm (error code bit 5, SDM Vol. 3A 4.7) is counted
 * and skipped; any other #PF is counted as "other" and skipped too. */
pf_entry:
        testb   $1, storm_on(%rip)
        jz      1f
        testl   $0x20, (%rsp)
        jz      1f
        inc     %r15
        addq    $3, 8(%rsp)
        add     $8, %rsp
        iretq
1:      incq    other_faults(%rip)
        addq    $3, 8(%rsp)
        add     $8, %rsp
        iretq

        .align 16
bad_stubs:
        .set vec, 0
        .rept 32
        .align 16
        mov     $vec, %eax
        jmp     bad
        .set vec, vec + 1
        .endr

bad:
        push    %rax
        mov     $'X', %al
        call    putc
        pop     %rax
        call    puthex
        mov     $'\n', %al
        call    putc
        mov     $2, %eax
        jmp     exit_qemu

/* al to COM1 */
putc:
        push    %rdx
        mov     $COM1, %dx
        out     %al, %dx
        pop     %rdx
        ret

/* rax in hex, 16 digits */
puthex:
        push    %rcx
        push    %rbx
        mov     %rax, %rbx
        mov     $16, %ecx
1:      rol     $4, %rbx
        mov     %bl, %al
        and     $15, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     2f
        add     $('a' - '9' - 1), %al
2:      call    putc
        dec     %ecx
        jnz     1b
        pop     %rbx
        pop     %rcx
        ret

/* isa-debug-exit: QEMU exits with (eax << 1) | 1 */
exit_qemu:
        mov     $0xF4, %dx
        out     %eax, %dx
        hlt
        jmp     exit_qemu

        .data
        .align 16
gdt:
        .quad   0
        .quad   0x00AF9A000000FFFF      /* 64-bit code */
        .quad   0x00CF92000000FFFF      /* data */
gdtr:
        .word   gdtr - gdt - 1
        .long   gdt
        .align 16
idtr:
        .word   32 * 16 - 1
        .quad   idt
la57:   .long   0
storm_on: .byte 0
        .align 8
other_faults: .quad 0

        .bss
        .align 4096
idt:    .space  32 * 16
        .align 16
        .space  16384
stack_top:
